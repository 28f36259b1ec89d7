"""Compile Loom's Triton kernels ahead of time for a GPU that is not here.

Run as a script, in a process where Triton was imported *without* ``TRITON_INTERPRET``
(under the interpreter, ``tl.max`` and the other library functions are interpreter objects
that the compiler cannot lower). For each case it calls a kernel wrapper with CPU tensors of
the case's shapes; the launches are recorded, not run, and each is compiled from the
recorded argument types and constants to a cubin for the case's compute capability.

    python tests/kernels/triton_compile_worker.py CASE [CASE ...]

prints one JSON object per compiled launch: case, kernel, shared memory (bytes), registers
a thread, spilled stack (bytes), or ``error`` when the compiler refused it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from loom.kernels import triton_decode, triton_ops

# (query heads, KV heads, head dim, hidden, intermediate) of real checkpoints.
SHAPES = {
    "llama-1b": (32, 8, 64, 2048, 8192),
    "qwen2-0.5b": (14, 2, 64, 896, 4864),  # a group of 7 query heads per KV head
    "qwen3-0.6b": (16, 8, 128, 1024, 3072),
    "mistral-7b": (32, 8, 128, 4096, 14336),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TRITON_TYPES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
    torch.int32: "i32", torch.int64: "i64", torch.bool: "i1", torch.uint8: "u8",
}  # fmt: skip
LAUNCH_OPTIONS = {"num_warps", "num_stages", "num_ctas"}  # a launch's keywords, not arguments


@dataclass
class Launch:
    """One recorded ``kernel[grid](*args, **kwargs)``."""

    kernel: Any  # a triton JITFunction
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class Recorder:
    """Stands in for a kernel: ``recorder[grid](...)`` records the launch."""

    def __init__(self, kernel: Any, launches: list[Launch]) -> None:
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid: object) -> Callable[..., None]:
        return lambda *args, **kwargs: self.launches.append(Launch(self.kernel, args, kwargs))


def record(launches: list[Launch]) -> None:
    """Make the modules' wrappers record their launches into ``launches``."""
    split, merge = triton_decode._kernels()
    decode = (Recorder(split, launches), Recorder(merge, launches))
    ops = {name: Recorder(kernel, launches) for name, kernel in triton_ops._kernels().items()}
    triton_decode._kernels = lambda: decode  # type: ignore[assignment]
    triton_ops._kernels = lambda: ops  # type: ignore[assignment]


def triton_type(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + TRITON_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def compile_for(launch: Launch, capability: int) -> Any:
    """Compile a recorded launch to a cubin for ``sm_{capability}``."""
    fn = launch.kernel
    options = {k: v for k, v in launch.kwargs.items() if k in LAUNCH_OPTIONS}
    values = dict(zip(fn.arg_names, launch.args, strict=False)) | {
        k: v for k, v in launch.kwargs.items() if k not in LAUNCH_OPTIONS
    }
    missing = set(fn.arg_names) - set(values)
    assert not missing, f"the launch passes no {sorted(missing)}"
    signature: dict[str, str] = {}
    constexprs: dict[tuple[int, ...], object] = {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params, strict=True)):
        if param.is_constexpr:
            signature[name], constexprs[(i,)] = "constexpr", values[name]
        else:
            signature[name] = triton_type(values[name])
    source = ASTSource(fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)


def resources(cubin: bytes) -> dict[str, int]:
    """Registers a thread and spilled stack bytes of a kernel, as ``cuobjdump`` (shipped in
    Triton's NVIDIA backend) reads them from the binary."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    assert found, out
    return {"regs": int(found[1]), "stack": int(found[2])}


def decode_attention(heads: int, kv_heads: int, dim: int, dtype: torch.dtype, splits: int) -> None:
    """``paged_decode_attention`` with the arguments ``StaticDecodeAttention`` passes."""
    batch, slots, pages = 2, 64, 4
    kv = torch.zeros(slots, kv_heads, dim, dtype=dtype)
    triton_decode.paged_decode_attention(
        torch.zeros(batch, heads, dim, dtype=dtype), kv, kv,
        torch.zeros(batch, pages, dtype=torch.int32), torch.zeros(batch, dtype=torch.int32),
        torch.zeros(batch, dtype=torch.int64), torch.zeros(slots, dtype=torch.int64),
        torch.zeros(slots, dtype=torch.bool), 16, dim**-0.5, splits,
    )  # fmt: skip


def fused_ops(
    heads: int, kv_heads: int, dim: int, hidden: int, inter: int, dtype: torch.dtype
) -> None:
    """The fused ops, with the layouts ``models.layers`` passes."""
    rows = 3
    x = torch.zeros(rows, hidden, dtype=dtype)
    triton_ops.rms_norm(x, x[0], 1e-6)
    triton_ops.silu_mul(torch.zeros(rows, 2 * inter, dtype=dtype))
    qkv = torch.zeros(rows, (heads + 2 * kv_heads) * dim, dtype=dtype)
    cos = torch.zeros(rows, dim, dtype=dtype)
    triton_ops.rotary(qkv[:, : heads * dim].view(rows, heads, dim), cos, torch.zeros_like(cos))


def doubled(x: Any) -> Any:
    return x * 2


def plain_call_launch() -> Launch:
    """A kernel the interpreter runs and the GPU compiler refuses: it calls a plain Python
    function (not ``@triton.jit``)."""

    @triton.jit
    def plain_call(x_ptr, out_ptr, N: tl.constexpr):  # type: ignore[no-untyped-def]
        i = tl.arange(0, N)
        tl.store(out_ptr + i, doubled(tl.load(x_ptr + i)))

    x = torch.zeros(16)
    return Launch(plain_call, (x, x), {"N": 16})


def launches_of(case: str, launches: list[Launch]) -> int:
    """Record the launches of ``case`` ("decode|ops/SHAPE/DTYPE/sm_CC" or "plain_call/sm_CC");
    return the compute capability."""
    *parts, arch = case.split("/")
    if parts == ["plain_call"]:
        launches.append(plain_call_launch())
    else:
        what, shape, dtype_name = parts
        heads, kv_heads, dim, hidden, inter = SHAPES[shape]
        dtype = DTYPES[dtype_name]
        if what == "decode":
            # A batch of one on 132 SMs takes the most splits; a full bucket takes one.
            for splits in sorted({triton_decode.splits_for(1, kv_heads, 132), 1}):
                decode_attention(heads, kv_heads, dim, dtype, splits)
        else:
            fused_ops(heads, kv_heads, dim, hidden, inter, dtype)
    return int(arch.removeprefix("sm_"))


def main(cases: list[str]) -> None:
    launches: list[Launch] = []
    record(launches)
    for case in cases:
        launches.clear()
        capability = launches_of(case, launches)
        for launch in launches:
            row: dict[str, object] = {"case": case, "kernel": launch.kernel.__name__}
            try:
                kernel = compile_for(launch, capability)
                row |= {"shared": kernel.metadata.shared, **resources(kernel.asm["cubin"])}
            except Exception as error:  # reported to the test, which fails
                row["error"] = f"{type(error).__name__}: {error}"[:2000]
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
