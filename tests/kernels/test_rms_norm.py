"""The CPU RMSNorm kernel against the reference formula (transformers' LlamaRMSNorm)."""

import pytest
import torch

from loom.kernels import cpu as cpu_kernels
from loom.models.layers import RMSNorm


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 512), (7, 100), (3, 5, 64), (300, 1024)])
def test_matches_the_reference(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    assert cpu_kernels.available()
    g = torch.Generator().manual_seed(len(shape) * shape[-1])
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype)
    got, ref = cpu_kernels.rms_norm(x, w, 1e-5), reference(x, w, 1e-5)
    assert got.shape == x.shape and got.dtype == dtype
    if dtype == torch.bfloat16:  # the same roundings: equal but for rare last-bit ties
        assert (got == ref).float().mean() > 0.999
        torch.testing.assert_close(got, ref, atol=0.05, rtol=0.01)
    else:
        torch.testing.assert_close(got, ref, atol=2e-6, rtol=2e-6)


def test_the_module_uses_it_only_without_autograd() -> None:
    norm = RMSNorm(64, 1e-6)
    x = torch.randn(4, 64)
    assert not cpu_kernels.rms_norm_applies(x, norm.weight)  # grad mode, weight trainable
    with torch.inference_mode():
        assert cpu_kernels.rms_norm_applies(x, norm.weight)
        fast = norm(x)
    slow = norm(x)  # torch's ops, with a graph
    assert slow.requires_grad and not fast.requires_grad
    torch.testing.assert_close(fast, slow.detach(), atol=2e-6, rtol=2e-6)


def test_bad_input_is_refused() -> None:
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="dtype"):
        cpu_kernels.rms_norm(x, torch.ones(8, dtype=torch.float64), 1e-6)
    with pytest.raises(RuntimeError, match="weight"):
        cpu_kernels.rms_norm(x, torch.ones(9), 1e-6)
