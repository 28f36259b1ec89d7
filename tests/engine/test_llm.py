"""The offline API and the built-in scheduler: caching, chunking, preemption, stops, errors."""

from pathlib import Path

import pytest
import torch

from loom import LLM, SamplingParams
from loom.engine.model_runner import LaunchedStep
from loom.errors import RequestError
from tests.helpers import assert_all_pages_free


def greedy(n: int, **kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)  # type: ignore[arg-type]


def token_prompts(lens: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 2048, (k,), generator=g).tolist() for k in lens]


@pytest.fixture(scope="module")
def reference(family_dirs: dict[str, Path]) -> tuple[Path, list[list[int]], list[list[int]]]:
    """A model, prompts, and their greedy outputs from a plain run (no cache, one step)."""
    path = family_dirs["qwen2"]
    ps = token_prompts([20, 45, 70, 33])
    llm = LLM(str(path), enable_prefix_caching=False)
    outs = [o.token_ids for o in llm.generate(ps, greedy(24, ignore_eos=True))]
    return path, ps, outs


def test_prefix_cache_hits_give_the_same_output(reference: tuple) -> None:
    path, ps, want = reference
    llm = LLM(str(path))
    first = llm.generate(ps, greedy(24, ignore_eos=True))
    # Same prompts again, and prompts sharing their first pages: served from the cache.
    again = llm.generate(ps, greedy(24, ignore_eos=True))
    assert [o.token_ids for o in first] == want == [o.token_ids for o in again]
    assert all(o.num_cached_tokens == 0 for o in first)
    assert [o.num_cached_tokens for o in again] == [16, 32, 64, 32]
    assert llm.engine.prefix_cache is not None and llm.engine.prefix_cache.hits > 0
    assert_all_pages_free(llm)


def test_chunked_prefill_gives_the_same_output(reference: tuple) -> None:
    path, ps, want = reference
    llm = LLM(str(path), max_num_batched_tokens=7, enable_prefix_caching=False)
    assert [o.token_ids for o in llm.generate(ps, greedy(24, ignore_eos=True))] == want
    # 168 prompt tokens at <= 7 per step: prefill alone needs >= 24 steps.
    assert llm.engine.stats.num_steps >= 24 + 23
    assert max(t for _, t in llm.engine.stats.recent_batches) <= 7
    assert_all_pages_free(llm)


def test_preemption_by_recompute_gives_the_same_output(reference: tuple) -> None:
    path, ps, want = reference
    # 16 pages x 16 slots cannot hold all four requests (~12 pages needed at the end).
    llm = LLM(str(path), num_pages=9, enable_prefix_caching=False)
    assert [o.token_ids for o in llm.generate(ps, greedy(24, ignore_eos=True))] == want
    assert llm.engine.scheduler.num_preemptions > 0
    assert_all_pages_free(llm)


def test_batched_equals_one_at_a_time(reference: tuple) -> None:
    path, ps, want = reference
    llm = LLM(str(path))
    assert [llm.generate(p, greedy(24, ignore_eos=True))[0].token_ids for p in ps] == want
    assert_all_pages_free(llm)


def test_stop_tokens_stop_strings_and_max_tokens(tiny_llm: LLM) -> None:
    prompt = "The model reads a long story"
    base = tiny_llm.generate(prompt, greedy(20, ignore_eos=True))[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 20
    # A stop token: generation ends at its first occurrence, the token included.
    stop_tok = base.token_ids[5]
    out = tiny_llm.generate(prompt, greedy(20, stop_token_ids=[stop_tok], ignore_eos=True))[0]
    first = base.token_ids.index(stop_tok)
    assert out.finish_reason == "stop" and out.token_ids == base.token_ids[: first + 1]
    # A stop string: text is cut before it.
    text = base.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), "need a visible stop string"
    rows_before = tiny_llm.engine.stats.num_outputs
    out = tiny_llm.generate(prompt, greedy(20, stop=[stop], ignore_eos=True))[0]
    assert out.finish_reason == "stop"
    assert out.text == text[: text.index(stop)]
    # It ran one more row after the token that completed the stop string (its text is made
    # while the next step runs); that row's token is dropped.
    n = len(out.token_ids)
    assert n < 20 and out.token_ids == base.token_ids[:n]
    assert tiny_llm.engine.stats.num_outputs - rows_before == n + 1
    assert stop in tiny_llm.tokenizer.decode(prompt_ids(tiny_llm, prompt) + out.token_ids)
    assert stop not in tiny_llm.tokenizer.decode(out.token_ids[:-1])
    assert_all_pages_free(tiny_llm)


def prompt_ids(llm: LLM, prompt: str) -> list[int]:
    return llm.tokenizer.encode(prompt)[-5:]  # the detokenizer's left context


def test_a_steps_text_is_made_while_the_next_step_runs(tiny_llm: LLM) -> None:
    """Order of host work: each step is launched, then the previous step's tokens become
    text, then the step's tokens are read back."""
    engine = tiny_llm.engine
    events: list[str] = []
    launch, detokenize = engine.runner.launch, engine.scheduler.outputs.detokenize

    def traced_launch(batch: object, feed: object = None) -> LaunchedStep:
        events.append("launch")
        step = launch(batch, feed)  # type: ignore[arg-type]
        return LaunchedStep(step.tokens, lambda: (events.append("wait"), step())[1])

    def traced_detokenize(req: object) -> object:
        events.append("text")
        return detokenize(req)  # type: ignore[arg-type]

    engine.runner.launch = traced_launch  # type: ignore[assignment,method-assign]
    engine.scheduler.outputs.detokenize = traced_detokenize  # type: ignore[assignment,method-assign]
    try:
        out = tiny_llm.generate([[5, 6, 7]], greedy(3, ignore_eos=True))[0]
    finally:
        del engine.runner.launch, engine.scheduler.outputs.detokenize
    assert len(out.token_ids) == 3 and out.finish_reason == "length"
    # prefill (token 1) | decode 2, text of 1 | decode 3, text of 2 | text of 3
    assert events == ["launch", "wait", "launch", "text", "wait", "launch", "text", "wait",
                      "text"]  # fmt: skip


def test_seeded_sampling_is_reproducible_whatever_the_batch(tiny_llm: LLM) -> None:
    p = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=42)
    alone = tiny_llm.generate("Hello", p)[0].token_ids
    others = SamplingParams(max_tokens=16, temperature=0.8)
    mixed = tiny_llm.generate(["Why is the sky blue?", "Hello", "Count"], [others, p, others])
    assert mixed[1].token_ids == alone
    other_seed = tiny_llm.generate(
        "Hello", SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=43)
    )[0].token_ids
    assert other_seed != alone


def test_stream_concatenates_to_the_generated_text(tiny_llm: LLM) -> None:
    params = greedy(30, ignore_eos=True)
    pieces = list(tiny_llm.stream("Café 🙂 and more", params))
    assert "".join(pieces) == tiny_llm.generate("Café 🙂 and more", params)[0].text
    assert len(pieces) > 1


def test_context_limit_finishes_with_length(tiny_dir: Path) -> None:
    llm = LLM(str(tiny_dir), max_model_len=40)
    out = llm.generate([list(range(10, 35))], greedy(100, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.prompt_token_ids) + len(out.token_ids) == 40
    assert_all_pages_free(llm)


@pytest.mark.parametrize(
    "prompt, params, msg",
    [
        ("", greedy(4), "empty"),
        ([], greedy(4), "empty"),
        ([5] * 40, greedy(4), "context"),
        ([5, 99999], greedy(4), "token ids"),
        ([5, 1.5], greedy(4), "integer token ids"),
        ([5, "7"], greedy(4), "integer token ids"),
        ("hi", SamplingParams(max_tokens=0), "max_tokens"),
        ("hi", SamplingParams(max_tokens=-3), "max_tokens"),
        ("hi", SamplingParams(temperature=-1.0), "temperature"),
        ("hi", SamplingParams(top_p=0.0), "top_p"),
        ("hi", SamplingParams(top_p=1.01), "top_p"),
        ("hi", SamplingParams(min_p=1.5), "min_p"),
        ("hi", SamplingParams(top_k=-2), "top_k"),
    ],
)
def test_bad_input_is_rejected_and_changes_nothing(
    tiny_dir: Path, prompt: object, params: SamplingParams, msg: str
) -> None:
    llm = LLM(str(tiny_dir), max_model_len=40, num_pages=32)
    with pytest.raises(RequestError, match=msg):
        # The good prompt first: a bad prompt anywhere must leave nothing queued.
        llm.generate(["fine prompt", prompt], params)  # type: ignore[list-item]
    assert not llm.engine.has_unfinished()
    assert llm.engine.stats.num_steps == 0
    assert llm.engine.pool.num_free == 32
