"""Dense copies of a steady decode batch's keys and values, appended one token per step.

Paged attention must gather every sequence's K/V out of the page pool each step, which on
CPU costs as much as the attention itself (batch 32, ~200-token contexts: ~4.6 of ~28 ms).
But continuous batching mostly repeats the same decode batch: the same sequences, each one
token longer. For such a *cohort* the mirror keeps per-layer dense K/V [S, kv_heads, cap, D]
(the layout of a static cache) and only writes the new token. Any other step (a new
member, a prefill, a page copy) makes the next decode step gather afresh and refill it.
The page pool stays the source of truth: every token is still written there too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loom.engine.batch import ForwardBatch

_CAP_STEP = 128  # dense length grows in these steps, so refills are rare
# The mirror's size cap unless the KV cache is larger; a 350M model's decode batch of 64
# (24 layers, 256-key capacity) needs 805 MB, and gathering instead doubled its step time.
MIN_MIRROR_CAP_BYTES = 512 * 2**20


@dataclass(slots=True)
class _Cohort:
    page_tables: list[list[int]]
    kv_lens: list[int]
    cache_version: int


class DecodeMirror:
    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        max_bytes: int = MIN_MIRROR_CAP_BYTES,
    ) -> None:
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.max_bytes = max_bytes
        self.dtype, self.device = dtype, device
        self._cohort: _Cohort | None = None
        self._k: list[torch.Tensor] = []  # per layer [S, kv_heads, cap, D]
        self._v: list[torch.Tensor] = []
        self.num_reused = self.num_filled = 0  # steps, for tests and metrics
        self._flat_of: torch.Tensor | None = None  # the step's ``index`` _flat was built for
        self._flat = torch.empty(0, dtype=torch.long, device=device)

    @property
    def capacity(self) -> int:
        return self._k[0].shape[2] if self._k else 0

    def plan(self, batch: ForwardBatch, kv_lens: list[int], cache_version: int) -> str:
        """Decide this step's mode: "reuse", "fill" or "off" (and forget stale state)."""
        decode_only = batch.num_tokens == batch.num_seqs and (
            batch.masks is None or all(m is None for m in batch.masks)
        )
        if not decode_only:
            self._cohort = None
            return "off"
        prev = self._cohort
        cohort = _Cohort([list(p) for p in batch.page_tables], list(kv_lens), cache_version)
        self._cohort = cohort
        if prev is not None and self._continues(prev, cohort) and max(kv_lens) <= self.capacity:
            self.num_reused += 1
            return "reuse"
        cap = -(-(max(kv_lens) + _CAP_STEP) // _CAP_STEP) * _CAP_STEP
        size = 2 * self.num_layers * len(kv_lens) * self.kv_heads * cap * self.head_dim
        if size * torch.finfo(self.dtype).bits // 8 > self.max_bytes:
            self._cohort = None
            return "off"
        shape = (len(kv_lens), self.kv_heads, cap, self.head_dim)
        if not self._k or self._k[0].shape != shape:
            # NOTE: zeros, not empty: slots past a sequence's length are masked out, but
            # SDPA still multiplies them, and uninitialised memory may hold NaN.
            self._k = [
                torch.zeros(shape, dtype=self.dtype, device=self.device)
                for _ in range(self.num_layers)
            ]
            self._v = [torch.zeros_like(t) for t in self._k]
        self.num_filled += 1
        return "fill"

    def reset(self) -> None:
        """Forget the cohort: steps taken elsewhere wrote keys the copies lack."""
        self._cohort = None

    @staticmethod
    def _continues(prev: _Cohort, cur: _Cohort) -> bool:
        if cur.cache_version != prev.cache_version or len(cur.kv_lens) != len(prev.kv_lens):
            return False
        for pt, kv, ppt, pkv in zip(
            cur.page_tables, cur.kv_lens, prev.page_tables, prev.kv_lens, strict=True
        ):
            if kv != pkv + 1 or len(pt) - len(ppt) not in (0, 1) or pt[: len(ppt)] != ppt:
                return False
        return True

    def fill(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store gathered keys/values [S, kv_heads, L, D] as the layer's dense copy."""
        length = keys.shape[2]
        self._k[layer][:, :, :length].copy_(keys)
        self._v[layer][:, :, :length].copy_(values)

    def append(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one new token per sequence (k, v: [S, kv_heads, D]) at ``index`` [S];
        return the layer's dense keys and values [S, kv_heads, length, D]."""
        km, vm = self._k[layer], self._v[layer]
        s_count, kv_heads, cap, dim = km.shape
        if self._flat_of is not index:
            # Row of (s, h, index[s]) in the [S * kv_heads * cap, D] view; the same for
            # every layer of the step, so built once (an index_copy_ into the flat view
            # costs a fraction of the advanced-indexing write per layer).
            heads = torch.arange(s_count * kv_heads, device=k.device).view(s_count, kv_heads)
            self._flat = (heads * cap + index[:, None]).view(-1)
            self._flat_of = index
        km.view(-1, dim).index_copy_(0, self._flat, k.reshape(-1, dim))
        vm.view(-1, dim).index_copy_(0, self._flat, v.reshape(-1, dim))
        return km[:, :, :length], vm[:, :, :length]
