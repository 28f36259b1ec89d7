"""Paged attention: per-step metadata built once, then one gather + SDPA per layer.

The metadata turns a ``ForwardBatch`` into index tensors shared by every layer:
``kv_slots`` [S, L] (each sequence's key slots, padded to the longest), ``slot_mapping``
[T] (where each new token's K/V goes) and a boolean ``allowed`` [S, 1, Q, L] that ANDs
sequence length, slot liveness, causal order by position and BRLE rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loom.engine.batch import ForwardBatch
from loom.engine.decode_mirror import DecodeMirror
from loom.engine.kv_cache import KVCache
from loom.engine.masks import decode_rows
from loom.kernels import cpu as cpu_kernels

_NEVER = 2**62  # the key position of a dead slot: past every query's position


@dataclass(slots=True)
class NativeArgs:
    """What the CPU kernel reads besides q and the page pool (``kernels.cpu``)."""

    key_rows: torch.Tensor  # [S, L] slot of each key
    key_pos: torch.Tensor  # [S, L] its position (_NEVER where the slot is dead)
    kv_lens: torch.Tensor  # [S]
    seq_indptr: torch.Tensor  # [S + 1] token rows of each sequence
    q_pos: torch.Tensor  # [T]


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] slot of each new token
    kv_slots: torch.Tensor  # [S * L] key slots per sequence, padded with slot 0
    # [S, 1, Q, L] true = attend; None = plain causal over this step's own tokens
    allowed: torch.Tensor | None
    num_seqs: int
    max_q: int  # Q
    max_kv: int  # L
    q_gather: torch.Tensor | None  # [S * Q] token row per padded query (None: no padding)
    q_scatter: torch.Tensor | None  # [T] padded query row of each token
    mirror_mode: str = "off"  # DecodeMirror plan: "reuse" | "fill" | "off"
    new_key_index: torch.Tensor | None = None  # [S] key index of each decode token
    # A batch that mixes one-token (decode) sequences with longer ones attends in groups:
    # padding every decode query to the longest sequence's length would multiply its
    # attention work by that length (an agent's 80-token observation in a pass of 32
    # decodes: ~80x). Each group: the token rows it owns [T_g] and its own metadata.
    groups: list[tuple[torch.Tensor, AttentionMetadata]] | None = None
    mask_free: bool = False  # ``allowed`` is all true: attend without it
    native: NativeArgs | None = None  # set: the CPU kernel attends, nothing else is used


def _is_fresh_causal(
    masks: list[list[list[int]] | None] | None,
    q_lens: list[int],
    kv_lens: list[int],
    i_in_seq: torch.Tensor,
    positions: torch.Tensor,
) -> bool:
    """True when every sequence is a fresh prefill at positions 0..n-1 with no BRLE rows.

    Then each sequence's keys are exactly its new tokens in position order, and attention
    is plain causal: no gather, no mask (SDPA skips the masked half of the work).
    """
    if masks is not None and any(m is not None for m in masks):
        return False
    if q_lens != kv_lens:
        return False
    return bool(torch.equal(positions, i_in_seq))


def build_metadata(
    batch: ForwardBatch,
    cache: KVCache,
    mirror: DecodeMirror | None = None,
    native: bool = False,
) -> AttentionMetadata:
    """Write the new tokens' slot positions/liveness and build the per-step index tensors.

    ``native``: the CPU kernel attends wherever no BRLE mask is set (it reads the page
    pool in place, so no gather, padding, grouping or mirror is needed)."""
    device = cache.slot_pos.device
    ps = cache.page_size
    s_count = batch.num_seqs
    q_lens = [batch.seq_indptr[i + 1] - batch.seq_indptr[i] for i in range(s_count)]
    kv_lens = [batch.kv_len(i, ps) for i in range(s_count)]
    max_kv = max(kv_lens)
    max_pages = max(len(p) for p in batch.page_tables)
    table = torch.tensor(
        [p + [0] * (max_pages - len(p)) for p in batch.page_tables],
        dtype=torch.long,
        device=device,
    )
    # [S, pages * ps] -> [S, L]: a page table read as slots.
    kv_slots = (table[:, :, None] * ps + torch.arange(ps, device=device)).view(s_count, -1)
    kv_slots = kv_slots[:, :max_kv].contiguous()
    positions = torch.tensor(batch.positions, dtype=torch.long, device=device)
    q_len_t = torch.tensor(q_lens, dtype=torch.long, device=device)
    kv_len_t = torch.tensor(kv_lens, dtype=torch.long, device=device)

    # Token t of sequence s is new token i; it lives at key index kv_len - q_len + i.
    seq_of_token = torch.repeat_interleave(torch.arange(s_count, device=device), q_len_t)
    starts = torch.tensor(batch.seq_indptr[:-1], dtype=torch.long, device=device)
    i_in_seq = torch.arange(batch.num_tokens, device=device) - starts[seq_of_token]
    key_index = kv_len_t[seq_of_token] - q_len_t[seq_of_token] + i_in_seq
    slot_mapping = kv_slots[seq_of_token, key_index]
    cache.slot_pos[slot_mapping] = positions
    cache.slot_live[slot_mapping] = True

    if native and (batch.masks is None or all(m is None for m in batch.masks)):
        if mirror is not None:
            mirror.reset()  # its copies miss what the kernel steps write
        key_pos = cache.slot_pos[kv_slots].masked_fill_(~cache.slot_live[kv_slots], _NEVER)
        indptr = torch.tensor(batch.seq_indptr, dtype=torch.long, device=device)
        return AttentionMetadata(
            slot_mapping=slot_mapping, kv_slots=kv_slots.view(-1), allowed=None,
            num_seqs=s_count, max_q=max(q_lens), max_kv=max_kv, q_gather=None,
            q_scatter=None, native=NativeArgs(kv_slots, key_pos, kv_len_t, indptr, positions),
        )  # fmt: skip

    decodes = [s for s in range(s_count) if q_lens[s] == 1]
    if decodes and len(decodes) < s_count:
        if mirror is not None:
            mirror.plan(batch, kv_lens, cache.version)  # not a decode batch: forget the cohort
        others = [s for s in range(s_count) if q_lens[s] > 1]
        one_token = q_len_t[seq_of_token] == 1  # [T]
        groups = []
        for sel, in_group in ((decodes, one_token), (others, ~one_token)):
            sel_t = torch.tensor(sel, dtype=torch.long, device=device)
            rows = in_group.nonzero().squeeze(1)  # [T_g] token rows, in sequence order
            lens = [kv_lens[i] for i in sel]
            masks = None if batch.masks is None else [batch.masks[i] for i in sel]
            meta = _group_metadata(
                kv_slots[sel_t][:, : max(lens)].contiguous(), [q_lens[i] for i in sel], lens,
                positions[rows], masks, cache,
            )  # fmt: skip
            groups.append((rows, meta))
        return AttentionMetadata(
            slot_mapping=slot_mapping, kv_slots=kv_slots.view(-1), allowed=None,
            num_seqs=s_count, max_q=max(q_lens), max_kv=max_kv, q_gather=None,
            q_scatter=None, groups=groups,
        )  # fmt: skip
    meta = _group_metadata(kv_slots, q_lens, kv_lens, positions, batch.masks, cache)
    meta.slot_mapping = slot_mapping
    if meta.allowed is not None and mirror is not None:
        meta.mirror_mode = mirror.plan(batch, kv_lens, cache.version)
        if meta.mirror_mode != "off":
            meta.new_key_index = key_index
    allowed = meta.allowed
    if (
        meta.max_q == 1
        and allowed is not None
        and allowed.device.type == "cpu"
        and bool(allowed.all())
    ):
        # Decode where every query sees all its keys (equal lengths, nothing hidden): SDPA
        # without a mask skips applying one per layer. CPU only: elsewhere the check would
        # be a host sync per step.
        meta.mask_free = True
    return meta


def _group_metadata(
    kv_slots: torch.Tensor,
    q_lens: list[int],
    kv_lens: list[int],
    positions: torch.Tensor,
    masks: list[list[list[int]] | None] | None,
    cache: KVCache,
) -> AttentionMetadata:
    """The index tensors of sequences attending together (their new tokens' slots are
    written already). ``kv_slots`` [S, L]; ``positions`` [T] of their tokens, in order."""
    device = kv_slots.device
    s_count, max_kv = kv_slots.shape
    max_q = max(q_lens)
    num_tokens = sum(q_lens)
    q_len_t = torch.tensor(q_lens, dtype=torch.long, device=device)
    kv_len_t = torch.tensor(kv_lens, dtype=torch.long, device=device)
    seq_of_token = torch.repeat_interleave(torch.arange(s_count, device=device), q_len_t)
    starts = torch.cumsum(q_len_t, 0) - q_len_t
    i_in_seq = torch.arange(num_tokens, device=device) - starts[seq_of_token]

    if max_q == 1:
        q_gather = q_scatter = None
        q_pos = positions.view(s_count, 1)
    else:
        padded_row = seq_of_token * max_q + i_in_seq  # [T]
        q_scatter = padded_row
        # Padding queries reuse the sequence's first token row; their output is dropped.
        q_gather = starts.repeat_interleave(max_q).clone()
        q_gather[padded_row] = torch.arange(num_tokens, device=device)
        q_pos = positions[q_gather].view(s_count, max_q)

    empty = torch.empty(0, dtype=torch.long, device=device)
    if _is_fresh_causal(masks, q_lens, kv_lens, i_in_seq, positions):
        return AttentionMetadata(
            slot_mapping=empty, kv_slots=kv_slots.view(-1), allowed=None, num_seqs=s_count,
            max_q=max_q, max_kv=max_kv, q_gather=q_gather, q_scatter=q_scatter,
        )  # fmt: skip
    key_pos = cache.slot_pos[kv_slots]  # [S, L]
    in_seq = torch.arange(max_kv, device=device)[None, :] < kv_len_t[:, None]
    key_ok = in_seq & cache.slot_live[kv_slots]
    allowed = key_ok[:, None, :] & (key_pos[:, None, :] <= q_pos[:, :, None])  # [S, Q, L]
    if masks is not None:
        for s, rows in enumerate(masks):
            if rows is not None:
                allowed[s, : len(rows), : kv_lens[s]] &= decode_rows(rows, kv_lens[s], device)
    if q_gather is not None:
        # A padding query must attend somewhere or SDPA yields NaN rows.
        pad = torch.arange(max_q, device=device)[None, :] >= q_len_t[:, None]
        allowed[:, :, 0] |= pad
    return AttentionMetadata(
        slot_mapping=empty, kv_slots=kv_slots.view(-1), allowed=allowed[:, None],
        num_seqs=s_count, max_q=max_q, max_kv=max_kv, q_gather=q_gather, q_scatter=q_scatter,
    )  # fmt: skip


class PagedAttention:
    """The ``AttentionBackend`` the model calls once per layer for one step."""

    def __init__(
        self,
        cache: KVCache,
        meta: AttentionMetadata,
        mirror: DecodeMirror | None = None,
        layer_hook: Callable[[int], None] | None = None,
    ) -> None:
        self.cache, self.meta, self.mirror = cache, meta, mirror
        # Called with the layer index once that layer's new K/V are in the cache (KV
        # transfer sends each layer while the next one computes).
        self.layer_hook = layer_hook

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        m = self.meta
        kv = self.cache.kv[layer]  # [2, slots, kv_heads, head_dim]
        kv[0].index_copy_(0, m.slot_mapping, k)
        kv[1].index_copy_(0, m.slot_mapping, v)
        if self.layer_hook is not None:
            self.layer_hook(layer)
        if m.native is not None:
            n = m.native
            out = cpu_kernels.paged_attention(
                q, kv[0], kv[1], n.key_rows, n.key_pos, n.kv_lens, n.seq_indptr, n.q_pos,
                q.shape[2] ** -0.5,
            )  # fmt: skip
            return out.view(q.shape[0], -1)
        if m.groups is None:
            return self._attend(layer, m, q, k, v)
        out = q.new_empty(q.shape[0], q.shape[1] * q.shape[2])
        for rows, g in m.groups:
            sel = (q.index_select(0, rows), k.index_select(0, rows), v.index_select(0, rows))
            out.index_copy_(0, rows, self._attend(layer, g, *sel))
        return out

    def _attend(
        self, layer: int, m: AttentionMetadata, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Attention of the tokens of ``m``'s sequences (their K/V are in the cache)."""
        kv = self.cache.kv[layer]
        s, ql, kl = m.num_seqs, m.max_q, m.max_kv
        heads, dim = q.shape[1], q.shape[2]
        qs = q if m.q_gather is None else q.index_select(0, m.q_gather)
        qs = qs.view(s, ql, heads, dim).transpose(1, 2)  # [S, H, Q, D]
        if m.allowed is None:
            # Fresh prefill: keys are this step's tokens, padded on the right like queries.
            if m.q_gather is not None:
                k, v = k.index_select(0, m.q_gather), v.index_select(0, m.q_gather)
            keys = k.view(s, ql, -1, dim).transpose(1, 2)
            values = v.view(s, ql, -1, dim).transpose(1, 2)
            out = F.scaled_dot_product_attention(
                qs, keys, values, is_causal=True, enable_gqa=keys.shape[1] != heads
            )
        else:
            if m.mirror_mode == "reuse":
                assert self.mirror is not None and m.new_key_index is not None
                keys, values = self.mirror.append(layer, k, v, m.new_key_index, kl)
            else:
                keys = kv[0].index_select(0, m.kv_slots).view(s, kl, -1, dim).transpose(1, 2)
                values = kv[1].index_select(0, m.kv_slots).view(s, kl, -1, dim).transpose(1, 2)
                if m.mirror_mode == "fill":
                    assert self.mirror is not None
                    self.mirror.fill(layer, keys, values)
            out = attend_grouped(qs, keys, values, None if m.mask_free else m.allowed)
        out = out.transpose(1, 2).reshape(s * ql, heads * dim)
        return out if m.q_scatter is None else out.index_select(0, m.q_scatter)


def attend_grouped(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor | None
) -> torch.Tensor:
    """SDPA of q [S, H, Q, D] over keys/values [S, KVH, L, D] under ``allowed`` [S, 1, Q, L]
    (None: every key).

    The query heads that share a KV head are folded into the query axis ([S, KVH, g*Q, D],
    the mask repeated g times): the same arithmetic as ``enable_gqa``, but the CPU kernel
    then streams each KV head once for all its query heads. A decode step of 64 sequences
    over 200 keys took 6.1 ms per layer with ``enable_gqa`` and 1.3 ms folded (Zen 4).
    """
    s, heads, ql, dim = q.shape
    kv_heads = keys.shape[1]
    if kv_heads == heads:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed)
    group = heads // kv_heads
    folded = q.reshape(s, kv_heads, group * ql, dim)  # rows ordered (group, query)
    mask = allowed if ql == 1 or allowed is None else allowed.repeat(1, 1, group, 1)
    out = F.scaled_dot_product_attention(folded, keys, values, attn_mask=mask)
    return out.view(s, heads, ql, dim)
