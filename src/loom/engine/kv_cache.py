"""The physical KV storage of one model: K/V tensors per layer plus per-slot state.

Storage is slot-major so a page table turns into row indices with one multiply-add:
slot = page_id * page_size + offset. Every slot also records the position of the token
written there and whether it is live (written and not masked); attention reads both.
Allocation and refcounts are not here: they are the pure-Python ``PagePool``.
"""

from __future__ import annotations

import torch

from loom.models.config import ModelConfig

# A position no query reaches: an unwritten slot is never causally visible.
UNWRITTEN = 2**62


class KVCache:
    def __init__(
        self,
        cfg: ModelConfig,
        num_pages: int,
        page_size: int,
        dtype: torch.dtype,
        device: torch.device,
        scratch_slot: bool = False,
    ) -> None:
        self.num_pages, self.page_size = num_pages, page_size
        self.num_slots = num_pages * page_size
        # One slot past every page, when asked: the padding rows of a fixed-size decode
        # batch (CUDA graphs) write their K/V there; no page table reaches it.
        self.scratch_slot: int | None = self.num_slots if scratch_slot else None
        stored = self.num_slots + int(scratch_slot)
        # [layers, 2 (k|v), slots (+ scratch), kv_heads, head_dim]
        self.kv = torch.zeros(
            cfg.num_layers,
            2,
            stored,
            cfg.num_kv_heads,
            cfg.head_dim,
            dtype=dtype,
            device=device,
        )
        self.slot_pos = torch.full((stored,), UNWRITTEN, dtype=torch.long, device=device)
        self.slot_live = torch.zeros(stored, dtype=torch.bool, device=device)
        self.version = 0  # bumped when stored K/V change outside a forward pass

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
        """KV bytes one token occupies across all layers (K and V)."""
        return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize

    def page_slots(self, pages: list[int]) -> torch.Tensor:
        p = torch.tensor(pages, dtype=torch.long, device=self.slot_pos.device)
        return (p[:, None] * self.page_size + torch.arange(self.page_size, device=p.device)).ravel()

    def reset_pages(self, pages: list[int]) -> None:
        """Mark every slot of ``pages`` unwritten (a freshly allocated page holds nothing)."""
        if pages:
            slots = self.page_slots(pages)
            self.slot_pos[slots] = UNWRITTEN
            self.slot_live[slots] = False

    def copy_slots(
        self, src_page: int, dst_page: int, src_offset: int, dst_offset: int, size: int
    ) -> None:
        """Copy ``size`` slots (KV of every layer, positions, liveness) between pages."""
        ps = self.page_size
        if not (
            src_offset >= 0
            and src_offset + size <= ps
            and dst_offset >= 0
            and dst_offset + size <= ps
        ):
            raise ValueError(f"slot range out of page bounds (page size {ps})")
        s = slice(src_page * ps + src_offset, src_page * ps + src_offset + size)
        d = slice(dst_page * ps + dst_offset, dst_page * ps + dst_offset + size)
        self.kv[:, :, d] = self.kv[:, :, s]
        self.version += 1
        self.slot_pos[d] = self.slot_pos[s]
        self.slot_live[d] = self.slot_live[s]

    def set_live(self, page: int, live: list[bool]) -> None:
        """Set the liveness of a page's slots (``False`` hides a slot from all later passes)."""
        if len(live) != self.page_size:
            raise ValueError(f"mask has {len(live)} entries, page size is {self.page_size}")
        start = page * self.page_size
        flags = torch.tensor(live, dtype=torch.bool, device=self.slot_live.device)
        written = self.slot_pos[start : start + self.page_size] != UNWRITTEN
        self.slot_live[start : start + self.page_size] = flags & written

    def place_slots(self, slots: list[int], positions: list[int]) -> None:
        """Make ``slots``, whose K/V were written outside a forward pass (received from
        another engine), visible at ``positions``."""
        idx = torch.tensor(slots, dtype=torch.long, device=self.slot_pos.device)
        self.slot_pos[idx] = torch.tensor(positions, dtype=torch.long, device=idx.device)
        self.slot_live[idx] = True
        self.version += 1
