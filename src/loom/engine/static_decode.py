"""Decode attention over fixed-size device buffers: the backend a CUDA graph captures.

A decode step has one new token per sequence, and that token is its sequence's last key.
Everything the step needs then fits in buffers whose shapes depend only on the batch-size
bucket: the new tokens' slots [B], page tables [B, P], key counts [B] and query positions
[B]. Rows past the real batch are padding: they write the cache's scratch slot and have no
keys.

On CUDA the Triton kernel (``kernels.triton_decode``) reads the page tables in place. The
torch fallback gathers the keys of every page-table column and masks; it gives the same
results and serves the CPU (where the decode path is tested) and checks the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loom.engine.attention import attend_grouped
from loom.engine.kv_cache import KVCache
from loom.kernels import triton_decode


@dataclass(slots=True)
class DecodeInputs:
    """Views of the static buffers for one bucket of B rows (padding included)."""

    slot_mapping: torch.Tensor  # [B] long: slot of each new token (scratch for padding)
    page_table: torch.Tensor  # [B, P] int32: page ids, read up to each row's key count
    kv_lens: torch.Tensor  # [B] long: keys of each row, its new token included (0: padding)
    positions: torch.Tensor  # [B] long: position of each new token


def reference_decode_attention(
    q: torch.Tensor, cache: KVCache, layer: int, inputs: DecodeInputs
) -> torch.Tensor:
    """q [B, H, D] -> [B, H, D]: SDPA over every page-table column's slots, masked by key
    count, liveness and causal order by position (the kernel's semantics)."""
    batch, width = inputs.page_table.shape
    ps = cache.page_size
    slots = inputs.page_table.long()[:, :, None] * ps + torch.arange(ps, device=q.device)
    slots = slots.view(batch, width * ps)  # [B, L]
    in_seq = torch.arange(width * ps, device=q.device)[None, :] < inputs.kv_lens[:, None]
    allowed = in_seq & cache.slot_live[slots] & (cache.slot_pos[slots] <= inputs.positions[:, None])
    allowed[:, 0] |= inputs.kv_lens == 0  # a padding row attends somewhere (no NaN)
    kv = cache.kv[layer]
    keys = kv[0][slots].transpose(1, 2)  # [B, KVH, L, D]
    values = kv[1][slots].transpose(1, 2)
    out = attend_grouped(q[:, :, None, :], keys, values, allowed[:, None, None, :])
    return out.squeeze(2)


class StaticDecodeAttention:
    """The ``AttentionBackend`` of a decode step whose inputs sit in ``DecodeInputs``.

    ``kernel``: attend with the Triton kernel (CUDA, or interpreted in tests); otherwise
    with ``reference_decode_attention``. ``num_splits``: the kernel's chunks per sequence.
    """

    def __init__(
        self, cache: KVCache, inputs: DecodeInputs, kernel: bool, num_splits: int = 1
    ) -> None:
        self.cache, self.inputs = cache, inputs
        self.kernel, self.num_splits = kernel, num_splits

    def write_positions(self) -> None:
        """Make the new tokens' slots visible at their positions (before the first layer)."""
        slots = self.inputs.slot_mapping
        self.cache.slot_pos.index_copy_(0, slots, self.inputs.positions)
        self.cache.slot_live.index_fill_(0, slots, True)

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        kv = self.cache.kv[layer]  # [2, slots, kv_heads, head_dim]
        kv[0].index_copy_(0, self.inputs.slot_mapping, k)
        kv[1].index_copy_(0, self.inputs.slot_mapping, v)
        if self.kernel:
            i = self.inputs
            out = triton_decode.paged_decode_attention(
                q, kv[0], kv[1], i.page_table, i.kv_lens, i.positions, self.cache.slot_pos,
                self.cache.slot_live, self.cache.page_size, q.shape[2] ** -0.5,
                self.num_splits,
            )  # fmt: skip
        else:
            out = reference_decode_attention(q, self.cache, layer, self.inputs)
        return out.reshape(q.shape[0], -1)
