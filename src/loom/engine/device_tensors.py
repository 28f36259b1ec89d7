"""Small host-to-device and device-to-host transfers that do not stall the GPU's queue.

``torch.tensor(values, device="cuda")`` copies from pageable memory and then waits for
everything already queued on the stream: with lookahead that is the pass in flight, so a
step's host work would wait for the previous pass instead of overlapping it. Copies here
go through pinned memory without waiting; PyTorch's pinned allocator keeps each buffer
until its copy has run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(
    values: Sequence[int] | Sequence[float] | Sequence[Sequence[int]],
    device: torch.device,
    dtype: torch.dtype = torch.long,
) -> torch.Tensor:
    """A tensor of ``values`` on ``device``, queued behind the stream's work on CUDA."""
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def copy_in(dst: torch.Tensor, host: torch.Tensor) -> None:
    """``dst.copy_(host)`` for a host tensor, queued on CUDA rather than waited for."""
    if dst.is_cuda:
        dst.copy_(host.pin_memory(), non_blocking=True)
    else:
        dst.copy_(host)


class HostCopies:
    """Device tensors copied to the host as soon as they are computed, with an event to
    wait on: reading them later waits for that copy, not for passes queued after it."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self._event: torch.cuda.Event | None = None
        if tensors and tensors[0].is_cuda:
            self.host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for h, t in zip(self.host, tensors, strict=True):
                h.copy_(t, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self.host = [t.cpu() for t in tensors]

    def get(self) -> list[torch.Tensor]:
        """The host copies, once they have arrived."""
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self.host
