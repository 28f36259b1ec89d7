"""The CPU paged-attention kernel against masked SDPA in float64 on gathered keys."""

import pytest
import torch
import torch.nn.functional as F

from loom.kernels import cpu as cpu_kernels

NEVER = 2**62


@pytest.fixture(scope="module", autouse=True)
def kernel() -> None:
    assert cpu_kernels.available(), "the kernel must build on a machine with a compiler"


def reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rows: torch.Tensor,
    pos: torch.Tensor,
    lens: list[int],
    q_lens: list[int],
    q_pos: torch.Tensor,
) -> torch.Tensor:
    heads, dim = q.shape[1], q.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float64)
    t0 = 0
    for s, (n, m) in enumerate(zip(lens, q_lens, strict=True)):
        keys = k_cache[rows[s, :n]].double().transpose(0, 1)  # [KVH, n, D]
        values = v_cache[rows[s, :n]].double().transpose(0, 1)
        qs = q[t0 : t0 + m].double().transpose(0, 1)  # [H, m, D]
        allowed = pos[s, :n][None, :] <= q_pos[t0 : t0 + m][:, None]  # [m, n]
        group = heads // keys.shape[0]
        o = F.scaled_dot_product_attention(
            qs, keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0),
            attn_mask=allowed,
        )  # fmt: skip
        seen = allowed.any(1)  # a query that sees nothing yields zeros
        out[t0 : t0 + m] = torch.where(seen[:, None, None], o.transpose(0, 1), 0.0)
        t0 += m
    assert dim == q.shape[2]
    return out


def make_case(
    q_lens: list[int],
    lens: list[int],
    heads: int,
    kv_heads: int,
    dim: int,
    dtype: torch.dtype,
    seed: int,
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    slots = 4 * sum(lens) + 64
    k_cache = torch.randn(slots, kv_heads, dim, generator=g).to(dtype)
    v_cache = torch.randn(slots, kv_heads, dim, generator=g).to(dtype)
    width = max(lens)
    # Scattered slots; positions in order with a hole, as after dropped tokens.
    perm = torch.randperm(slots, generator=g)
    rows = perm[: len(lens) * width].view(len(lens), width).contiguous()
    pos = torch.arange(width).repeat(len(lens), 1) * 2
    q = torch.randn(sum(q_lens), heads, dim, generator=g).to(dtype)
    # Each sequence's queries are its last q_len keys (causal by position).
    q_pos = torch.cat(
        [pos[s, n - m : n] for s, (n, m) in enumerate(zip(lens, q_lens, strict=True))]
    )
    return q, k_cache, v_cache, rows, pos, q_pos


def run(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rows: torch.Tensor,
    pos: torch.Tensor,
    lens: list[int],
    q_lens: list[int],
    q_pos: torch.Tensor,
) -> torch.Tensor:
    indptr = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()])
    return cpu_kernels.paged_attention(
        q, k_cache, v_cache, rows, pos, torch.tensor(lens), indptr, q_pos, q.shape[2] ** -0.5
    )


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim"), [(4, 4, 16), (8, 4, 64), (16, 4, 128), (6, 2, 32)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_decode_and_mixed_match_reference(
    heads: int, kv_heads: int, dim: int, dtype: torch.dtype
) -> None:
    # A long prefill (many tiles, skipped blocks), decodes, and a continuation.
    q_lens, lens = [150, 1, 1, 7, 1], [150, 40, 97, 70, 1]
    q, kc, vc, rows, pos, q_pos = make_case(q_lens, lens, heads, kv_heads, dim, dtype, seed=dim)
    got = run(q, kc, vc, rows, pos, lens, q_lens, q_pos)
    ref = reference(q, kc, vc, rows, pos, lens, q_lens, q_pos)
    assert got.dtype == dtype and got.shape == q.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.double(), ref, atol=tol, rtol=tol)


def test_many_decodes_take_the_all_heads_items() -> None:
    # 64 one-token sequences: the items cover every KV head at once.
    q_lens, lens = [1] * 64, [33 + s for s in range(64)]
    q, kc, vc, rows, pos, q_pos = make_case(q_lens, lens, 8, 4, 64, torch.bfloat16, seed=1)
    got = run(q, kc, vc, rows, pos, lens, q_lens, q_pos)
    ref = reference(q, kc, vc, rows, pos, lens, q_lens, q_pos)
    torch.testing.assert_close(got.double(), ref, atol=1e-2, rtol=1e-2)


def test_dead_slots_and_unseen_keys() -> None:
    q_lens, lens = [3, 1], [20, 9]
    q, kc, vc, rows, pos, q_pos = make_case(q_lens, lens, 4, 2, 64, torch.float32, seed=2)
    pos[0, 5] = NEVER  # a dead slot in the middle
    pos[1, :] = 10**6  # the second sequence's keys lie past its query: nothing to see
    got = run(q, kc, vc, rows, pos, lens, q_lens, q_pos)
    ref = reference(q, kc, vc, rows, pos, lens, q_lens, q_pos)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(got[3]) == 0
    # Hiding a key changes the rows that saw it.
    pos[0, 5] = 10
    assert not torch.equal(run(q, kc, vc, rows, pos, lens, q_lens, q_pos)[:3], got[:3])


def test_result_does_not_depend_on_threads_or_batch() -> None:
    q_lens, lens = [64, 1, 1], [64, 50, 300]
    q, kc, vc, rows, pos, q_pos = make_case(q_lens, lens, 8, 4, 64, torch.bfloat16, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(q, kc, vc, rows, pos, lens, q_lens, q_pos)
    finally:
        torch.set_num_threads(threads)
    many = run(q, kc, vc, rows, pos, lens, q_lens, q_pos)
    assert torch.equal(one, many)
    # The last sequence alone gives the same bits as inside the batch.
    alone = run(q[65:], kc, vc, rows[2:], pos[2:], lens[2:], q_lens[2:], q_pos[65:])
    assert torch.equal(alone, many[65:])


def test_bad_input_is_refused() -> None:
    q, kc, vc, rows, pos, q_pos = make_case([1], [4], 4, 2, 24, torch.float32, seed=4)
    with pytest.raises(RuntimeError, match="head_dim"):
        run(q, kc, vc, rows, pos, [4], [1], q_pos)
    q, kc, vc, rows, pos, q_pos = make_case([1], [4], 4, 2, 16, torch.float32, seed=4)
    with pytest.raises(RuntimeError, match="dtype"):
        run(q, kc.double(), vc, rows, pos, [4], [1], q_pos)


def test_the_runner_takes_the_kernel_only_where_it_pays(monkeypatch: pytest.MonkeyPatch) -> None:
    from loom.engine.model_runner import ModelRunner
    from tests.helpers import random_model

    model = random_model()
    monkeypatch.setattr(cpu_kernels, "attention_pays_here", lambda: True)
    assert ModelRunner(model, num_pages=8, page_size=4).native_attention
    assert not ModelRunner(model, num_pages=8, page_size=4, native_attention=False).native_attention
    monkeypatch.setattr(cpu_kernels, "attention_pays_here", lambda: False)  # AVX2 only
    assert not ModelRunner(model, num_pages=8, page_size=4).native_attention


def test_this_cpu_is_classified_by_its_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: "flags\t: fpu avx2 avx512f avx512bw")
    assert cpu_kernels.attention_pays_here()
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: "flags\t: fpu avx2 fma")
    assert not cpu_kernels.attention_pays_here()
