"""Lookahead (the GPU's step order): the next step is scheduled and launched before the
current one is read back, its decode rows fed on the device. On this CPU it is switched
on by hand; whatever the step order, the outputs must be the same."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loom import LLM, SamplingParams
from tests.helpers import assert_all_pages_free


def greedy(n: int, **kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)  # type: ignore[arg-type]


def token_prompts(lens: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 2048, (k,), generator=g).tolist() for k in lens]


def both(path: Path, prompts: list, params: list | SamplingParams, **kw: object) -> tuple:
    """(outputs, llm) without and with lookahead, on fresh engines."""
    runs = []
    for lookahead in (False, True):
        llm = LLM(str(path), **kw)  # type: ignore[arg-type]
        llm.engine.lookahead = lookahead
        runs.append((llm.generate(prompts, params), llm))
    return runs[0], runs[1]


def fields(outs: list) -> list:
    """What must be equal; log-probabilities are compared apart (``close_logprobs``): a
    step order that admits a request a step later batches rows differently, and a row's
    float sums may differ in the last bits."""
    return [(o.token_ids, o.text, o.finish_reason,
             None if o.top_logprobs is None else [[i for i, _ in t] for t in o.top_logprobs])
            for o in outs]  # fmt: skip


def close_logprobs(a: list, b: list) -> None:
    for x, y in zip(a, b, strict=True):
        assert (x.logprobs is None) == (y.logprobs is None)
        if x.logprobs is not None:
            assert torch.allclose(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-4)


@pytest.mark.parametrize("kw", [{}, {"num_pages": 9, "enable_prefix_caching": False},
                                {"max_num_batched_tokens": 7}])  # fmt: skip
def test_same_outputs_with_and_without_lookahead(family_dirs: dict[str, Path],
                                                 kw: dict) -> None:  # fmt: skip
    """Shrinking batches, logprobs, and (by parameter) preemption by recompute in a small
    pool and chunked prefill mixed with decoding."""
    prompts = token_prompts([20, 45, 70, 33, 9])
    params = [greedy(n, ignore_eos=True, logprobs=2) for n in (12, 30, 5, 21, 17)]
    if "num_pages" in kw:  # the preemption case of test_llm: ~12 pages needed at the end
        prompts, params = prompts[:4], greedy(24, ignore_eos=True, logprobs=2)
    (plain, _), (ahead, llm) = both(family_dirs["qwen2"], prompts, params, **kw)
    assert fields(ahead) == fields(plain)
    close_logprobs(ahead, plain)
    if "num_pages" in kw:
        assert llm.engine.scheduler.num_preemptions > 0
    assert_all_pages_free(llm)
    assert all(not r.num_pending for r in llm.engine.scheduler.running)


def test_prefix_cache_hits_and_seeded_sampling(family_dirs: dict[str, Path]) -> None:
    path = family_dirs["llama3"]
    prompts = token_prompts([40, 40, 25], seed=1)
    prompts[1][:32] = prompts[0][:32]  # shares two pages with the first
    params = [SamplingParams(max_tokens=20, temperature=0.9, seed=s, ignore_eos=True)
              for s in (1, 2, 3)]  # fmt: skip
    (plain, _), (ahead, llm) = both(path, prompts, params)
    assert fields(ahead) == fields(plain)
    again = llm.generate(prompts, params)  # a second round from the prefix cache
    assert fields(again) == fields(plain)
    assert [o.num_cached_tokens for o in again] == [32, 32, 16]
    assert_all_pages_free(llm)


def test_ends_by_token_cost_one_row_and_ends_by_length_none(tiny_dir: Path) -> None:
    prompt = "The model reads a long story"
    base = LLM(str(tiny_dir)).generate(prompt, greedy(20, ignore_eos=True))[0]
    stop_tok = base.token_ids[5]
    stop_text = base.text[len(base.text) // 2 : len(base.text) // 2 + 3]
    # (params, extra rows without lookahead, with): a length end is known ahead; a stop
    # token is known once read back, a step late with lookahead; a stop string once
    # detokenized, a step late either way.
    cases = [
        (greedy(20, ignore_eos=True), 0, 0),
        (greedy(20, stop_token_ids=[stop_tok], ignore_eos=True), 0, 1),
        (greedy(20, stop=[stop_text], ignore_eos=True), 1, 1),
    ]
    for params, extra_plain, extra_ahead in cases:
        (plain, p_llm), (ahead, a_llm) = both(tiny_dir, [prompt], params)
        assert fields(ahead) == fields(plain)
        n = len(plain[0].token_ids)
        assert p_llm.engine.stats.num_outputs == n + extra_plain, params
        assert a_llm.engine.stats.num_outputs == n + extra_ahead, params
        assert_all_pages_free(a_llm)


def test_abort_and_stream_with_lookahead(tiny_dir: Path) -> None:
    llm = LLM(str(tiny_dir))
    llm.engine.lookahead = True
    want = LLM(str(tiny_dir)).generate("Once upon a time", greedy(12, ignore_eos=True))[0].text
    assert "".join(llm.stream("Once upon a time", greedy(12, ignore_eos=True))) == want
    req = llm.engine.add_request("Hello there", greedy(50, ignore_eos=True))
    for _ in range(4):
        llm.engine.step()
    assert llm.engine.abort_request(req.request_id)
    while llm.engine.has_unfinished():
        llm.engine.step()
    assert req.finish_reason == "abort" and no_placeholders(req.output_ids)
    assert_all_pages_free(llm)


def no_placeholders(ids: list[int]) -> bool:
    return all(t >= 0 for t in ids)
