"""The fused GPU ops give what the torch ops they replace give.

Without a GPU they run in Triton's interpreter (float32 and float16: the interpreter has no
bfloat16); on a GPU the last test compares a bfloat16 model's logits with the ops on and
off.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loom.kernels import triton_decode, triton_ops
from loom.models.layers import apply_rotary

pytestmark = pytest.mark.skipif(not triton_decode.available(), reason="Triton not installed")
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:  # at most one rounding step apart
        torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_torch(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 3, 96, generator=g) * 3).to(DEVICE, dtype)
    w = (1 + torch.randn(96, generator=g) * 0.1).to(DEVICE, dtype)
    want = w * F.rms_norm(x, (96,), eps=1e-6)
    close(triton_ops.rms_norm(x, w, 1e-6), want)
    strided = x[:, 1]  # rows of a view with a stride of its own
    close(triton_ops.rms_norm(strided, w, 1e-6), w * F.rms_norm(strided, (96,), eps=1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_torch(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    gate_up = (torch.randn(7, 2 * 1300, generator=g) * 4).to(DEVICE, dtype)  # two blocks
    gate, up = gate_up.split(1300, dim=-1)
    close(triton_ops.silu_mul(gate_up), F.silu(gate) * up)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_matches_the_torch_path(dtype: torch.dtype) -> None:
    """On q and k as strided views of a fused qkv output, as the attention layer has them."""
    g = torch.Generator().manual_seed(2)
    t, heads, kv_heads, dim = 6, 4, 2, 32
    qkv = torch.randn(t, (heads + 2 * kv_heads) * dim, generator=g).to(DEVICE, dtype)
    qk = qkv[:, : (heads + kv_heads) * dim].view(t, heads + kv_heads, dim)
    angles = torch.arange(t)[:, None] * torch.rand(dim // 2, generator=g)[None, :]
    cos = torch.cat([angles.cos()] * 2, -1).to(DEVICE, dtype)
    sin = torch.cat([-angles.sin(), angles.sin()], -1).to(DEVICE, dtype)
    want = apply_rotary(qk.cpu(), cos.cpu(), sin.cpu()).to(DEVICE)  # the torch ops
    got = triton_ops.rotary(qk, cos, sin)
    assert got.is_contiguous()
    close(got, want)


def test_ops_apply_only_to_gpu_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not triton_ops.applies(torch.zeros(2))
    if CUDA:
        x = torch.zeros(2, device="cuda")
        assert triton_ops.applies(x)
        monkeypatch.setenv("LOOM_TRITON_OPS", "0")
        assert not triton_ops.applies(x)


@pytest.mark.skipif(not CUDA, reason="needs CUDA (the layers use the ops on GPU tensors)")
def test_bf16_model_logits_with_and_without_the_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    from loom.engine.batch import ForwardBatch
    from loom.engine.model_runner import ModelRunner
    from tests.helpers import random_model

    model = random_model().to("cuda", torch.bfloat16)
    batch = ForwardBatch(
        token_ids=list(range(3, 40)), positions=list(range(37)), seq_indptr=[0, 37],
        page_tables=[[0, 1, 2]], last_page_lens=[5],
    )  # fmt: skip
    logits = []
    for flag in ("1", "0"):
        monkeypatch.setenv("LOOM_TRITON_OPS", flag)
        runner = ModelRunner(model, num_pages=4, page_size=16)
        logits.append(runner.forward_logits(batch, list(range(37))))
    # Same rounding points: the logits agree to bf16 noise and pick the same tokens.
    torch.testing.assert_close(logits[0], logits[1], atol=0.05, rtol=0.05)
    assert (logits[0].argmax(-1) == logits[1].argmax(-1)).float().mean() > 0.95
