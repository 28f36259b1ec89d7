"""Loom's CPU kernels (``csrc/``): built on first use for this CPU, cached.

``paged_attention`` (``csrc/cpu_attention.cpp``, ``bf16_tile.h``) and ``rms_norm``
(``csrc/rms_norm.cpp``), registered as ``torch.ops.loom_cpu``.

torch's CPU SDPA reaches ~30 GFLOP/s on a 512-token causal prefill at head dim 64 and
reads a decode batch's K/V at ~7 GB/s after the engine has gathered them out of the page
pool; the kernel reads pages in place, skips masked key blocks and keeps fp32 throughout.
It is compiled for the build machine's CPU (``-march=native``) into torch's extension
cache, under a name that includes the CPU's feature flags, so a cache shared between
different machines never loads code for the wrong one. Where no compiler is found or the
build fails, ``available()`` is false and the callers take torch's own ops.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = ("cpu_attention.cpp", "rms_norm.cpp")
# LOOM_CPU_KERNELS=0 turns the kernels off (torch's ops then run everywhere).
_ENV = "LOOM_CPU_KERNELS"
_lock = threading.Lock()
_state: dict[str, bool] = {}


def _cpu_flags() -> str:
    """The first ``flags`` (x86) or ``Features`` (Arm) line of /proc/cpuinfo ("" if none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return ""


def attention_pays_here() -> bool:
    """True on CPUs with AVX-512 (F and BW), where the attention kernel beats SDPA.

    Built for AVX2 alone the same source is correct but slow (its 16-lane vectors split in
    two, shuffles and masks scalarised): a 512-token prefill took 60 ms against SDPA's 4.5
    on a Zen 4 built with -march=haswell. RMSNorm pays everywhere (4x at one row).
    """
    flags = _cpu_flags().split()
    return "avx512f" in flags and "avx512bw" in flags


def _cpu_tag() -> str:
    """A short hash of this CPU's feature flags, the kernel sources and torch's version."""
    flags = _cpu_flags()
    sources = b"".join(
        p.read_bytes() for p in sorted(_CSRC.iterdir()) if p.suffix in (".cpp", ".h")
    )
    digest = hashlib.sha256(flags.encode() + sources + torch.__version__.encode())
    return digest.hexdigest()[:12]


_HEAD_DIMS = (16, 32, 64, 128, 256)  # compiled into the kernel
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def attention_supported(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """True when the kernel should run this model's attention (building it if needed)."""
    return (
        device.type == "cpu"
        and dtype in _DTYPES
        and head_dim in _HEAD_DIMS
        and attention_pays_here()
        and available()
    )


def available() -> bool:
    """True once the kernels are built and registered as ``torch.ops.loom_cpu``."""
    ok = _state.get("ok")
    if ok is not None:
        return ok
    with _lock:
        if "ok" not in _state:
            _state["ok"] = _build()
        return _state["ok"]


def _build() -> bool:
    if os.environ.get(_ENV, "1") == "0":
        return False
    log.info("loading Loom's CPU kernels (compiled on first use, ~20 s)")
    try:
        from torch.utils import cpp_extension

        cpp_extension.load(
            name=f"loom_cpu_kernels_{_cpu_tag()}",
            sources=[str(_CSRC / name) for name in _SOURCES],
            # -fopenmp: at::parallel_for is inlined here and runs serially without it. The
            # libgomp it links is the one torch has loaded already (same soname).
            extra_cflags=["-O3", "-march=native", "-std=c++17", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, an unsupported CPU: fall back
        log.warning("Loom's CPU kernels are unavailable (%s); using torch's ops", exc)
        return False
    return True


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key_rows: torch.Tensor,
    key_pos: torch.Tensor,
    kv_lens: torch.Tensor,
    seq_indptr: torch.Tensor,
    q_pos: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of q [T, H, D] over k/v_cache [slots, KVH, D] read through key_rows [S, L].

    Key j of sequence s (rows seq_indptr[s]:seq_indptr[s+1] of q) is seen by query t when
    j < kv_lens[s] and key_pos[s, j] <= q_pos[t]. Returns [T, H, D] in q's dtype; a query
    that sees no key gets zeros.
    """
    op = torch.ops.loom_cpu.paged_attention
    out: torch.Tensor = op(
        q, k_cache, v_cache, key_rows, key_pos, kv_lens, seq_indptr, q_pos, scale
    )
    return out


def rms_norm_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when ``rms_norm`` can take this call: CPU, one dtype, no autograd wanted."""
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype
        and x.dtype in _DTYPES
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and available()
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x * rsqrt(mean(x^2) + eps)) over the last dim, rounded as the reference
    rounds: the normalised row to x's dtype, then the product."""
    out: torch.Tensor = torch.ops.loom_cpu.rms_norm(x, weight, eps)
    return out
