"""Reusable model pieces: RMSNorm, rotary embeddings at explicit positions, the gated MLP."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loom.kernels import cpu as cpu_kernels
from loom.kernels import triton_ops


def _mkldnn_linear_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(
        torch.ops.mkldnn, "_linear_pointwise"
    )


class Linear(nn.Linear):
    """``nn.Linear`` with faster CPU bf16 paths once ``prepack()`` has run.

    NOTE: for bf16 weights (measured on the 41.6M model's shapes):
    - several rows run 1.2-2.5x faster on weights prepacked into oneDNN's blocked
      layout (LM head at 32 rows 3.1 -> 1.2 ms). The packed copy doubles weight memory.
    - one row (batch-1 decode) is weight-bandwidth bound, and which kernel streams the
      weights fastest depends on the CPU: on Sapphire Rapids ``torch.mv`` beat the GEMM
      ~1.7x, on Zen 4 the packed GEMM beats ``torch.mv`` 2-9x. ``prepack`` times both
      on the weight itself and keeps the faster one.
    """

    _packed: torch.Tensor | None = None
    _mv_for_one_row = True

    def prepack(self) -> None:
        w = self.weight
        if w.dtype == torch.bfloat16 and w.device.type == "cpu" and _mkldnn_linear_available():
            try:
                self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach())
            except RuntimeError:
                # oneDNN's bf16 path needs AVX-512 (or AVX-NE-CONVERT); without it the
                # plain GEMM serves (an AVX2-only CPU refuses the reorder at load time).
                self._packed = None
        if self._packed is not None:
            self._mv_for_one_row = _one_row_mv_is_faster(w.detach(), self._packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.dtype == torch.bfloat16 and not x.is_cuda:
            if x.shape[0] == 1 and self._mv_for_one_row:
                y = torch.mv(self.weight, x[0])
                return (y if self.bias is None else y + self.bias)[None]
            if self._packed is not None:
                out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
                    x, self._packed, self.bias, "none", [], ""
                )
                return out
        return super().forward(x)


def _one_row_mv_is_faster(weight: torch.Tensor, packed: torch.Tensor) -> bool:
    """Time ``torch.mv`` and the packed GEMM on one row of ``weight`` [N, K] (best of 3)."""
    x = torch.ones(1, weight.shape[1], dtype=weight.dtype)

    def best(fn: Callable[[], Any]) -> float:
        fn()  # first call: oneDNN builds its kernel
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    packed_s = best(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""))
    return best(lambda: torch.mv(weight, x[0])) < packed_s


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back, as the HF reference does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same arithmetic as the HF reference (normalise in float32, cast, then scale):
        # the fused kernel normalises a bf16 input in float32 and rounds once, bit for bit
        # what ``rms_norm(x.float()).to(bf16)`` gives, without the two float32 copies.
        if cpu_kernels.rms_norm_applies(x, self.weight):
            return cpu_kernels.rms_norm(x, self.weight, self.eps)  # the same in one call
        if triton_ops.applies(x) and x.dtype == self.weight.dtype:
            return triton_ops.rms_norm(x, self.weight, self.eps)  # GPU: one launch
        normed = F.rms_norm(x, (x.shape[-1],), eps=self.eps)
        return self.weight * normed


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] with Llama 3 / linear scaling applied."""
    # float32 arithmetic on purpose: it is what the HF reference computes, bit for bit.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if scaling is None:
        return inv_freq
    kind = scaling.get("rope_type")
    if kind == "linear":
        return (inv_freq / float(scaling["factor"])).float()
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are divided by `factor`, short ones kept, the band between blended.
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(is_medium, blended, scaled).float()
    raise NotImplementedError(f"rope_type {kind!r} is not supported (use default, linear, llama3)")


class RotaryEmbedding(nn.Module):
    """Rotary position embedding looked up at explicit positions.

    A cos/sin table is grown on demand so a step costs one index_select, whatever order
    or gaps the positions have (inferlets choose positions freely).
    """

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None) -> None:
        super().__init__()
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta, scaling), persistent=False)
        self._table: torch.Tensor | None = None  # [max_pos, head_dim] as cos | sin halves

    @property
    def table(self) -> torch.Tensor | None:
        """The cos | sin table [max_pos, head_dim] (None before the first lookup)."""
        return self._table

    def _grow(self, size: int, device: torch.device) -> torch.Tensor:
        size = max(size, 256)
        pos = torch.arange(size, dtype=torch.float32, device=device)
        freqs = torch.outer(pos, self.inv_freq.to(device))  # [size, head_dim/2]
        self._table = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
        return self._table

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype, max_position: int | None = None
    ) -> tuple[torch.Tensor, ...]:
        """cos [T, head_dim] (each half duplicated, HF ``rotate_half`` layout) and the
        signed sin [T, head_dim] ``apply_rotary`` takes: the first half negated.

        ``max_position``: the largest of ``positions`` when the caller knows it; otherwise
        it is read from the tensor, a host synchronisation on a GPU (and not allowed while
        a CUDA graph is captured)."""
        table = self._table
        if max_position is None:
            max_position = int(positions.max()) if positions.numel() else 0
        max_pos = max_position + 1
        if table is None or table.shape[0] < max_pos or table.device != positions.device:
            table = self._grow(
                max(max_pos, 2 * (0 if table is None else table.shape[0])), positions.device
            )
        cs = table.index_select(0, positions)
        cos, sin = cs.chunk(2, dim=-1)
        return torch.cat([cos, cos], -1).to(dtype), torch.cat([-sin, sin], -1).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos, signed_sin: [T, head_dim] from ``cos_sin``.

    HF's ``x * cos + rotate_half(x) * sin``, rotate_half(x) = [-x2, x1]: the sign moves
    into the sin table ([-x2, x1] * [s, s] == [x2, x1] * [-s, s] exactly), which saves a
    pass over the heads per layer.
    """
    if triton_ops.applies(x):
        return triton_ops.rotary(x, cos, signed_sin)  # one launch instead of four
    half = x.shape[-1] // 2
    swapped = torch.cat([x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + swapped * signed_sin[:, None, :]


def fuse_linears(parts: list[nn.Linear]) -> Linear:
    """One ``Linear`` whose output is the concatenation of ``parts``' outputs."""
    w = torch.cat([p.weight.detach() for p in parts])
    fused = Linear(
        w.shape[1], w.shape[0], bias=parts[0].bias is not None, device=w.device, dtype=w.dtype
    )
    fused.weight = nn.Parameter(w, requires_grad=False)
    if parts[0].bias is not None:
        fused.bias = nn.Parameter(
            torch.cat([p.bias.detach() for p in parts]),
            requires_grad=False,
        )
    return fused


class GatedMLP(nn.Module):
    """SwiGLU feed-forward with HF parameter names (gate_proj, up_proj, down_proj)."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.gate_proj = Linear(hidden, intermediate, bias=False)
        self.up_proj = Linear(hidden, intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)
        self.gate_up_proj: Linear | None = None

    def fuse(self) -> None:
        """Replace gate_proj and up_proj by one GEMM (after loading: fewer, larger matmuls)."""
        self.gate_up_proj = fuse_linears([self.gate_proj, self.up_proj])
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate_up = self.gate_up_proj(x)
            if triton_ops.applies(gate_up):
                return self.down_proj(triton_ops.silu_mul(gate_up))  # type: ignore[no-any-return]
            gate, up = gate_up.split(self.intermediate, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        out: torch.Tensor = self.down_proj(F.silu(gate).mul_(up))
        return out
