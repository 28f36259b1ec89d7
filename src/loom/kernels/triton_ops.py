# mypy: allow-untyped-defs
"""Small fused GPU ops as Triton kernels: RMSNorm, rotary embedding, SiLU·mul.

A decode step of a small model is a few hundred kernels, most of them elementwise ops on
a few kilobytes; inside a CUDA graph each still costs a couple of microseconds of GPU
time. These kernels do in one launch what the torch ops do in two to four, and round at
the same points (each torch op rounds its result to the tensor's dtype), so their output
is the torch composition's, bit for bit where the float32 arithmetic agrees.

CUDA only (chosen by device in ``models.layers``); ``LOOM_TRITON_OPS=0`` turns them off.
Tests run them under ``TRITON_INTERPRET=1`` on CPU.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from loom.kernels import triton_decode

_ENV = "LOOM_TRITON_OPS"


def applies(x: torch.Tensor) -> bool:
    """True when ``x`` lives on a GPU and the kernels are on (and can be built)."""
    return x.is_cuda and os.environ.get(_ENV, "1") != "0" and triton_decode.available()


@functools.cache
def _kernels() -> dict[str, Any]:
    import triton
    import triton.language as tl

    @triton.jit
    def rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_o, eps,
                        DIM: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        row = tl.program_id(0)
        d = tl.arange(0, BLOCK)
        ok = d < DIM
        x = tl.load(x_ptr + row * stride_x + d, mask=ok, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / DIM + eps)
        # Normalised in float32, rounded (as F.rms_norm returns it), then scaled and rounded.
        y = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + d, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_o + d, (y * w).to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, INTER: tl.constexpr,
                        BLOCK: tl.constexpr):  # fmt: skip
        row = tl.program_id(0)
        col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = col < INTER
        gate = tl.load(x_ptr + row * stride_x + col, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * stride_x + INTER + col, mask=ok, other=0.0).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * stride_o + col, (act * up).to(out_ptr.dtype.element_ty),
                 mask=ok)  # fmt: skip

    @triton.jit
    def rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, stride_xt, stride_xh, stride_ct,
                      HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                      BLOCK_D: tl.constexpr):  # fmt: skip
        t = tl.program_id(0)
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]  # the first half's columns
        ok = (h < HEADS) & (d < HALF)
        base = x_ptr + t * stride_xt + h * stride_xh
        lo = tl.load(base + d, mask=ok, other=0.0).to(tl.float32)
        hi = tl.load(base + HALF + d, mask=ok, other=0.0).to(tl.float32)
        c_lo = tl.load(cos_ptr + t * stride_ct + d, mask=d < HALF, other=0.0).to(tl.float32)
        c_hi = tl.load(cos_ptr + t * stride_ct + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)
        s_lo = tl.load(sin_ptr + t * stride_ct + d, mask=d < HALF, other=0.0).to(tl.float32)
        s_hi = tl.load(sin_ptr + t * stride_ct + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)
        ty = out_ptr.dtype.element_ty
        # x * cos + swapped * signed_sin, swapped = [hi, lo]; each product rounded, then
        # the sum, as the torch ops do.
        new_lo = (lo * c_lo).to(ty).to(tl.float32) + (hi * s_lo).to(ty).to(tl.float32)
        new_hi = (hi * c_hi).to(ty).to(tl.float32) + (lo * s_hi).to(ty).to(tl.float32)
        out = out_ptr + (t * HEADS + h) * (2 * HALF)
        tl.store(out + d, new_lo.to(ty), mask=ok)
        tl.store(out + HALF + d, new_hi.to(ty), mask=ok)

    return {"rms_norm": rms_norm_kernel, "silu_mul": silu_mul_kernel, "rotary": rotary_kernel}


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * F.rms_norm(x)`` over the last dim of x [..., D] (rows may be strided)."""
    dim = x.shape[-1]
    rows = x.reshape(-1, dim)
    assert rows.stride(-1) == 1
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        _kernels()["rms_norm"][(rows.shape[0],)](
            rows, weight, out, rows.stride(0), out.stride(0), eps, DIM=dim, BLOCK=_pow2(dim)
        )
    return out.view(x.shape)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of gate_up [N, 2 * I] (gate first) -> [N, I]."""
    n, width = gate_up.shape
    inter = width // 2
    assert gate_up.stride(1) == 1
    out = torch.empty(n, inter, dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, _pow2(inter))
    if n:
        _kernels()["silu_mul"][(n, -(-inter // block))](
            gate_up, out, gate_up.stride(0), out.stride(0), INTER=inter, BLOCK=block
        )
    return out


def rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """``models.layers.apply_rotary`` in one kernel: x [T, heads, D] (a strided view is
    fine), cos and signed_sin [T, D] -> a new contiguous [T, heads, D]."""
    t, heads, dim = x.shape
    assert x.stride(2) == 1 and cos.stride(1) == 1 and signed_sin.stride() == cos.stride()
    out = torch.empty(t, heads, dim, dtype=x.dtype, device=x.device)
    if t:
        _kernels()["rotary"][(t,)](
            x, cos, signed_sin, out, x.stride(0), x.stride(1), cos.stride(0),
            HEADS=heads, HALF=dim // 2, BLOCK_H=_pow2(heads), BLOCK_D=_pow2(dim // 2),
        )  # fmt: skip
    return out
