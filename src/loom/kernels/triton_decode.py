# mypy: allow-untyped-defs
"""Paged decode attention as a Triton kernel: one query per sequence, CUDA-graph safe.

Every input is a tensor read on the device (page tables, key counts, query positions, the
per-slot positions and liveness of ``KVCache``), and the launch grid depends only on the
batch-size bucket, so a captured graph replays it for any page layout or context length.

Loom's masks are applied per key slot: a key counts when its index is below the
sequence's key count, its slot is live and its position is not after the query's. (BRLE
rows take the eager path; they are not read here.)

Flash-decoding: the keys of one sequence are split into ``num_splits`` chunks attended by
separate programs (grid ``[B, kv_heads, splits]``) so a batch of one still fills the GPU;
a second kernel merges the chunks by their log-sum-exp. The query heads that share a KV
head are handled by one program, so each K/V row is read once for the whole group.

Triton is imported lazily: it ships with the CUDA builds of PyTorch, and the CPU path never
needs it (tests run the kernel under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch


@functools.cache
def available() -> bool:
    """True when Triton can be imported (the kernel then runs on CUDA, or interpreted)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernels() -> tuple[Any, Any]:
    """Compile-on-first-use kernels (a module without Triton still imports)."""
    import triton
    import triton.language as tl

    @triton.jit
    def split_kernel(
        q_ptr, k_ptr, v_ptr, table_ptr, kv_lens_ptr, q_pos_ptr, slot_pos_ptr, slot_live_ptr,
        part_out_ptr, part_lse_ptr, scale,
        stride_qb, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_tb,
        PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        kv_len = tl.load(kv_lens_ptr + b)
        q_pos = tl.load(q_pos_ptr + b)
        # Chunks are whole blocks, so every split but the last starts block-aligned.
        chunk = tl.cdiv(tl.cdiv(kv_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
        start = split * chunk
        end = tl.minimum(start + chunk, kv_len)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        g_ok = g < GROUP
        d_ok = d < HEAD_DIM
        heads = kvh * GROUP + g
        q = tl.load(
            q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
            mask=g_ok[:, None] & d_ok[None, :], other=0.0,
        )  # fmt: skip
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            j = n0 + tl.arange(0, BLOCK_N)
            j_ok = j < end
            page = tl.load(table_ptr + b * stride_tb + j // PAGE_SIZE, mask=j_ok, other=0)
            slot = page.to(tl.int64) * PAGE_SIZE + j % PAGE_SIZE
            pos = tl.load(slot_pos_ptr + slot, mask=j_ok, other=0)
            live = tl.load(slot_live_ptr + slot, mask=j_ok, other=0)
            ok = j_ok & (live != 0) & (pos <= q_pos)
            kv_mask = j_ok[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + slot[:, None] * stride_ks + kvh * stride_kh + d[None, :],
                        mask=kv_mask, other=0.0)  # fmt: skip
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [G, N]
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: no NaN
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + slot[:, None] * stride_vs + kvh * stride_vh + d[None, :],
                        mask=kv_mask, other=0.0)  # fmt: skip
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        seen = l_i > 0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
        # part_out [B, H, NUM_SPLITS, D] float32, part_lse [B, H, NUM_SPLITS]
        row = (b * (tl.num_programs(1) * GROUP) + heads) * NUM_SPLITS + split
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + d[None, :], out,
                 mask=g_ok[:, None] & d_ok[None, :])  # fmt: skip
        tl.store(part_lse_ptr + row, lse, mask=g_ok)

    @triton.jit
    def merge_kernel(
        part_out_ptr, part_lse_ptr, out_ptr, stride_ob, stride_oh,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0)
        h = tl.program_id(1)
        row0 = (b * tl.num_programs(1) + h) * NUM_SPLITS
        s = tl.arange(0, BLOCK_S)
        d = tl.arange(0, BLOCK_D)
        s_ok = s < NUM_SPLITS
        lse = tl.load(part_lse_ptr + row0 + s, mask=s_ok, other=float("-inf"))
        m = tl.max(lse, 0)
        w = tl.where(lse == float("-inf"), 0.0, tl.exp(lse - tl.where(m == float("-inf"), 0.0, m)))
        parts = tl.load(part_out_ptr + (row0 + s)[:, None] * HEAD_DIM + d[None, :],
                        mask=s_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)  # fmt: skip
        total = tl.sum(w, 0)
        out = tl.sum(parts * w[:, None], 0) / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + d,
                 out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)  # fmt: skip

    return split_kernel, merge_kernel


def _pow2(n: int, floor: int) -> int:
    return max(floor, 1 << (n - 1).bit_length())


def _tiling(block_d: int, dtype: torch.dtype) -> tuple[int, int]:
    """Keys per loop iteration (several pages: the page table is read per key) and warps
    of a split program, so that its tiles and their gathered addresses fit in registers.
    [64, 128] tiles spill at 4 warps (sm_90, bf16: 254 registers a thread, 64 B spilled),
    float32 ones of [64, 64] too (Triton 3.6), and float32 [64, 128] ones even at 8; each
    choice here spills nothing with Triton 3.6 and 3.9 (``test_triton_compile.py``)."""
    if dtype == torch.float32:
        return (32 if block_d >= 128 else 64), 8
    return 64, (8 if block_d >= 128 else 4)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    kv_lens: torch.Tensor,
    q_pos: torch.Tensor,
    slot_pos: torch.Tensor,
    slot_live: torch.Tensor,
    page_size: int,
    scale: float,
    num_splits: int,
) -> torch.Tensor:
    """Attention of one query per sequence over its paged keys.

    q [B, H, D]; k_cache, v_cache [slots, KVH, D] (a layer of ``KVCache.kv``);
    page_table [B, P] int32 (page ids, read up to ``ceil(kv_lens[b] / page_size)``);
    kv_lens [B] int32 (0: a padding row, whose output is zeros); q_pos [B] int64;
    slot_pos [slots] int64 and slot_live [slots] bool. Returns [B, H, D] in q's dtype.
    """
    split_kernel, merge_kernel = _kernels()
    batch, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    assert q.stride(2) == k_cache.stride(2) == v_cache.stride(2) == 1, "head_dim must be dense"
    part_out = torch.empty(batch, heads, num_splits, dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(batch, heads, num_splits, dtype=torch.float32, device=q.device)
    # float32 runs exact float32 products (no TF32), so float32 output matches a reference.
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    block_d = _pow2(dim, 16)
    block_n, warps = _tiling(block_d, q.dtype)
    split_kernel[(batch, kv_heads, num_splits)](
        q, k_cache, v_cache, page_table, kv_lens, q_pos, slot_pos, slot_live,
        part_out, part_lse, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), page_table.stride(0),
        PAGE_SIZE=page_size, GROUP=group, BLOCK_G=_pow2(group, 16), HEAD_DIM=dim,
        BLOCK_D=block_d, BLOCK_N=block_n, NUM_SPLITS=num_splits, PRECISION=precision,
        num_warps=warps,
    )  # fmt: skip
    out = torch.empty_like(q)
    merge_kernel[(batch, heads)](
        part_out, part_lse, out, out.stride(0), out.stride(1),
        HEAD_DIM=dim, BLOCK_D=_pow2(dim, 16), NUM_SPLITS=num_splits,
        BLOCK_S=_pow2(num_splits, 2),
    )  # fmt: skip
    return out


def splits_for(batch: int, kv_heads: int, processors: int) -> int:
    """Chunks per sequence so that a batch gives the GPU about two programs per
    multiprocessor (a batch of one over 8 KV heads on 132 SMs: 32 chunks)."""
    want = -(-2 * processors // max(1, batch * kv_heads))
    return max(1, min(32, _pow2(want, 1)))
