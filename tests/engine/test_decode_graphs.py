"""Decode steps from fixed buffers (the CUDA-graph path) must give the eager path's logits.

On this CPU the buffers run eagerly with the torch fallback attention, and the Triton
kernel runs under Triton's interpreter; graph capture itself needs CUDA (those tests skip
without it and run on a GPU machine).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loom import LLM, SamplingParams
from loom.engine.batch import ForwardBatch, OutputSpec
from loom.engine.decode_graphs import DecodeGraphs, buckets_up_to
from loom.engine.model_runner import ModelRunner
from loom.kernels import triton_decode
from tests.helpers import assert_all_pages_free, random_model, single_seq_batch

PS = 4
TABLES = [[3, 7, 1, 12, 5, 9, 20, 21], [0, 2, 4, 6, 8, 10, 22, 23], [11, 13, 14, 15, 16, 17, 24]]
CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not triton_decode.available(), reason="Triton not installed")


def decode_batch(tokens: list[int], positions: list[int], kv_lens: list[int],
                 tables: list[list[int]]) -> ForwardBatch:  # fmt: skip
    pages = [-(-n // PS) for n in kv_lens]
    return ForwardBatch(
        token_ids=tokens, positions=positions, seq_indptr=list(range(len(tokens) + 1)),
        page_tables=[t[:p] for t, p in zip(tables, pages, strict=True)],
        last_page_lens=[n - (p - 1) * PS for n, p in zip(kv_lens, pages, strict=True)],
        outputs=[OutputSpec(i) for i in range(len(tokens))],
    )  # fmt: skip


def run_steps(runner: ModelRunner) -> list[torch.Tensor]:
    """Prefill three sequences, hide a key, then decode with 3, 2 and 1 sequences; the
    third sequence's positions run ahead of its key indices (as after dropped keys)."""
    prompts = [list(range(5, 14)), list(range(20, 26)), list(range(30, 33))]
    offsets = [0, 0, 7]
    for p, t, off in zip(prompts, TABLES, offsets, strict=True):
        pos = [off + i for i in range(len(p))]
        runner.forward_logits(single_seq_batch(p, pos, t, len(p), PS), [0])
    runner.cache.set_live(TABLES[0][1], [True, False, True, True])  # hide key 5 of seq 0
    lens = [len(p) for p in prompts]
    out = []
    for step in range(9):
        live = [0, 1, 2] if step < 4 else [0, 1] if step < 7 else [1]
        for s in live:
            lens[s] += 1
        batch = decode_batch(
            [40 + step + s for s in live], [lens[s] - 1 + offsets[s] for s in live],
            [lens[s] for s in live], [TABLES[s] for s in live],
        )  # fmt: skip
        out.append(runner.forward_logits(batch, list(range(len(live)))).clone())
    return out


def make_runners(kernel: bool, dtype: torch.dtype = torch.float32,
                 device: str = "cpu") -> tuple[ModelRunner, ModelRunner]:  # fmt: skip
    model = random_model().to(device=device, dtype=dtype)
    eager = ModelRunner(model, num_pages=32, page_size=PS, native_attention=False)
    static = ModelRunner(model, num_pages=32, page_size=PS, native_attention=False,
                         decode_graphs=True)  # fmt: skip
    static.start_decode_graphs(max_batch=4, max_len=64, kernel=kernel, progress=False)
    return eager, static


def test_buckets_are_powers_of_two_covering_the_largest_batch() -> None:
    assert buckets_up_to(1) == [1]
    assert buckets_up_to(5) == [1, 2, 4, 8]
    assert buckets_up_to(256)[-1] == 256 and len(buckets_up_to(256)) == 9


def test_fixed_buffer_decode_matches_eager_steps() -> None:
    eager, static = make_runners(kernel=False)
    ref, got = run_steps(eager), run_steps(static)
    for r, g in zip(ref, got, strict=True):
        torch.testing.assert_close(g, r, atol=2e-5, rtol=2e-5)
        assert torch.equal(g.argmax(-1), r.argmax(-1))
    graphs = static.graphs
    assert graphs is not None and graphs.num_eager == 9  # every decode step took the path
    # The scratch slot took the padding rows' writes; no real slot was touched by them.
    n = static.cache.num_slots
    assert static.cache.slot_live[n]
    assert torch.equal(static.cache.slot_pos[:n], eager.cache.slot_pos)
    assert torch.equal(static.cache.slot_live[:n], eager.cache.slot_live)
    torch.testing.assert_close(static.cache.kv[:, :, :n], eager.cache.kv, atol=2e-5, rtol=2e-5)


def test_other_steps_take_the_eager_path() -> None:
    _, static = make_runners(kernel=False)
    graphs = static.graphs
    assert graphs is not None
    prefill = single_seq_batch([1, 2, 3], [0, 1, 2], TABLES[0], 3, PS)
    assert not graphs.applies(prefill)
    masked = single_seq_batch([4], [3], TABLES[0], 4, PS, masks=[[4]])
    assert not graphs.applies(masked)
    far = single_seq_batch([4], [64], TABLES[0], 4, PS)  # past the context length
    assert not graphs.applies(far)
    too_many = decode_batch([1] * 5, [0] * 5, [1] * 5, [[i] for i in range(5)])
    assert not graphs.applies(too_many)  # more sequences than the largest bucket (4)
    static.forward_logits(prefill, [2])
    static.forward_logits(masked, [0])
    assert graphs.num_eager == 0 and graphs.num_replays == 0
    static.layer_hook = lambda layer: None  # a KV transfer in progress: eager, hook called
    static.forward_logits(single_seq_batch([5], [4], TABLES[0], 5, PS), [0])
    assert graphs.num_eager == 0


def test_engine_on_cpu_keeps_the_eager_path() -> None:
    from loom.config import EngineConfig
    from loom.engine.engine import Engine

    engine = Engine(EngineConfig(num_pages=16))
    assert engine.runner.graphs is None and engine.runner.cache.scratch_slot is None


def test_graphs_refuse_a_cache_without_scratch_slot() -> None:
    runner = ModelRunner(random_model(), num_pages=8, page_size=PS, native_attention=False)
    with pytest.raises(ValueError, match="scratch slot"):
        DecodeGraphs(runner.model, runner.cache, 4, 32)


@needs_triton
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(8, 2, 32), (14, 2, 128)])
def test_triton_kernel_matches_reference(heads: int, kv_heads: int, dim: int) -> None:
    """Random page tables, hidden slots, positions out of key order, a padding row, and
    every split count the grid may use; a group of 7 heads and a head of 128 (8 warps)."""
    device = "cuda" if CUDA else "cpu"
    gen = torch.Generator().manual_seed(0)
    ps, pages = 16, 40
    slots = pages * ps
    k = torch.randn(slots, kv_heads, dim, generator=gen)
    v = torch.randn(slots, kv_heads, dim, generator=gen)
    slot_pos = torch.randint(0, 300, (slots,), generator=gen)
    slot_live = torch.rand(slots, generator=gen) > 0.2
    kv_lens = torch.tensor([5, 150, 0, 64], dtype=torch.int32)
    table = torch.stack([torch.randperm(pages, generator=gen)[:12] for _ in range(4)])
    q = torch.randn(4, heads, dim, generator=gen)
    q_pos = torch.tensor([100, 250, 0, 299])
    ref = []
    for b in range(4):
        n = int(kv_lens[b])
        j = torch.arange(n)
        sl = table[b][j // ps] * ps + j % ps
        ok = slot_live[sl] & (slot_pos[sl] <= q_pos[b])
        keys = k[sl].repeat_interleave(heads // kv_heads, 1).transpose(0, 1)  # [H, n, D]
        vals = v[sl].repeat_interleave(heads // kv_heads, 1).transpose(0, 1)
        scores = (keys @ q[b][:, :, None]).squeeze(2) * dim**-0.5
        scores[:, ~ok] = float("-inf")
        ref.append((scores.softmax(-1)[:, None, :] @ vals).squeeze(1) if n else q[b] * 0)
    index = [t.to(device) for t in (table.to(torch.int32), kv_lens, q_pos, slot_pos, slot_live)]
    for splits in (1, 3, 32):
        out = triton_decode.paged_decode_attention(
            *(t.to(device) for t in (q, k, v)), *index, ps, dim**-0.5, splits
        ).cpu()
        torch.testing.assert_close(out, torch.stack(ref), atol=1e-5, rtol=1e-5)
    # Half precision: products in fp16 on tensor cores, softmax and sums in float32.
    half = [t.to(device, torch.float16) for t in (q, k, v)]
    out = triton_decode.paged_decode_attention(*half, *index, ps, dim**-0.5, 4)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float().cpu(), torch.stack(ref), atol=5e-3, rtol=5e-3)


@needs_triton
def test_model_steps_with_the_triton_kernel() -> None:
    eager, static = make_runners(kernel=True, device="cuda" if CUDA else "cpu")
    ref, got = run_steps(eager), run_steps(static)
    for r, g in zip(ref, got, strict=True):
        torch.testing.assert_close(g, r, atol=2e-5, rtol=2e-5)
    graphs = static.graphs
    assert graphs is not None
    assert graphs.num_replays + graphs.num_eager == 9
    if CUDA:  # captured at start: every step replays
        assert graphs.num_replays == 9 and graphs.captured == [1, 2, 4]


@pytest.mark.skipif(not CUDA, reason="needs CUDA (graph capture)")
def test_llm_tokens_equal_with_and_without_graphs(tiny_dir: Path) -> None:
    """Greedy float32 generation through captured graphs equals the eager engine's, for
    batches that land in several buckets."""
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    prompts = [list(range(10 + i, 20 + 3 * i)) for i in range(5)]
    graphed = LLM(str(tiny_dir), device="cuda", num_pages=256, cuda_graph_max_batch=8)
    graphs = graphed.engine.runner.graphs
    assert graphs is not None and graphs.captured == [1, 2, 4, 8]
    eager = LLM(str(tiny_dir), device="cuda", num_pages=256, cuda_graphs=False)
    for batch in (prompts[:1], prompts[:3], prompts):
        got = [o.token_ids for o in graphed.generate(batch, params)]
        want = [o.token_ids for o in eager.generate(batch, params)]
        assert got == want
    assert graphs.num_replays >= 3 * 23 and graphs.num_eager == 0


def static_decode_llm(path: Path, max_batch: int) -> LLM:
    """An LLM whose decode steps run from the fixed buffers, as on CUDA (eagerly here)."""
    llm = LLM(str(path))
    engine, old = llm.engine, llm.engine.runner
    runner = ModelRunner(old.model, old.cache.num_pages, old.cache.page_size,
                         native_attention=False, decode_graphs=True)  # fmt: skip
    runner.states = old.states
    runner.start_decode_graphs(max_batch, engine.max_model_len, kernel=False)
    engine.runner = runner
    return llm


@pytest.mark.parametrize(("family", "lookahead"),
                         [("llama3", False), ("qwen3", False), ("llama3", True)])  # fmt: skip
def test_scheduler_decode_through_fixed_buffers(family_dirs: dict[str, Path], family: str,
                                                lookahead: bool) -> None:  # fmt: skip
    """The built-in scheduler's steps (batches shrinking from 5 to 1 as requests finish,
    prefix-cache hits on the second round) give the tokens of the eager engine; with
    lookahead (the GPU's order) the decode rows' tokens are fed into the buffers on the
    device."""
    path = family_dirs[family]
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(10, 2048, (n,), generator=g).tolist() for n in (20, 45, 70, 33, 9)]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
              for n in (12, 30, 5, 21, 17)]  # fmt: skip
    want = [o.token_ids for o in LLM(str(path)).generate(prompts, params)]
    llm = static_decode_llm(path, max_batch=4)
    llm.engine.lookahead = lookahead
    for _ in range(2):
        assert [o.token_ids for o in llm.generate(prompts, params)] == want
    graphs = llm.engine.runner.graphs
    assert graphs is not None and graphs.num_eager > 20  # batches of 4 and fewer
    assert_all_pages_free(llm)
