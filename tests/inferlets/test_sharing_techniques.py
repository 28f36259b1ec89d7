"""Prefix caching and best-of-n: a persistent prefix is computed once (a later run
computes only its own tokens, with the same output), and n samples decode together from
one prompt, the best by mean log-probability first."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loom import LLM, SamplingParams
from tests.inferlets.conftest import program, reply
from tests.runtime_helpers import free_pages

PREFIX = "Chapter one. " + " ".join(f"Line {i} of the long shared document." for i in range(30))


def _computed(rt: Any) -> int:
    return int(rt.worker.stats().num_tokens)


def test_a_persistent_prefix_is_computed_once(irt: Any, tiny_dir: Path) -> None:
    prog = program(irt, "prefix_caching")
    irt.query(lambda: irt.prefix_cache.clear())  # (the export alone must do the sharing)
    prompt, n = " Question: what is on line 7?", 8
    t0 = _computed(irt)
    first = json.loads(reply(irt, prog, PREFIX, prompt, str(n)))
    t1 = _computed(irt)
    irt.query(lambda: irt.prefix_cache.clear())
    second = json.loads(reply(irt, prog, PREFIX, prompt, str(n)))
    t2 = _computed(irt)
    assert (first["imported"], second["imported"]) == (False, True)
    assert first["text"] == second["text"]
    tok = irt.tokenizer
    prefix_ids = tok.encode(PREFIX, add_special_tokens=False)
    prompt_ids = tok.encode(prompt, add_special_tokens=False)
    assert len(prefix_ids) > 200
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    want = LLM(str(tiny_dir), num_pages=64).generate([prefix_ids + prompt_ids], params)[0].text
    assert first["text"] == want
    # The second run computed its prompt, the prefix's partly filled last page and the
    # generated tokens: not the prefix.
    assert t2 - t1 <= len(prompt_ids) + 16 + n
    assert t1 - t0 >= len(prefix_ids)


def test_best_of_n_decodes_its_samples_together_and_ranks_them(irt: Any) -> None:
    prog = program(irt, "best_of_n")
    free0 = free_pages(irt)
    start = irt.query(lambda: len(irt.stats.batch_sizes))
    got = json.loads(reply(irt, prog, "Once upon a time", "4", "12", "1.0", "all"))
    samples = got["samples"]
    assert len(samples) == 4 and got["best"] == samples[0]["text"]
    means = [s["mean_logprob"] for s in samples]
    assert means == sorted(means, reverse=True) and all(m < 0 for m in means)
    assert len({tuple(s["tokens"]) for s in samples}) > 1  # different seeds, samples
    sizes = irt.query(lambda: list(irt.stats.batch_sizes)[start:])
    assert max(sizes) >= 4  # the four forks rode one pass
    assert free_pages(irt) == free0


def test_a_prompt_tree_shares_its_common_pages(irt: Any, tiny_dir: Path) -> None:
    prog = program(irt, "prefix_tree")
    free0 = free_pages(irt)
    irt.query(lambda: irt.prefix_cache.clear())
    root = "An old story told three ways. " * 8
    t0 = _computed(irt)
    got = json.loads(reply(irt, prog, root, "6"))
    computed = _computed(irt) - t0
    assert len(got["leaves"]) == 8
    assert got["root_page_holders"] == 8  # every leaf holds the root's first page
    assert got["pages_used"] < got["pages_separate"] / 2
    # The root was computed once, not eight times.
    root_tokens = len(irt.tokenizer.encode(root, add_special_tokens=False))
    assert root_tokens > 64 and computed < 8 * root_tokens
    # Each leaf equals its prompt generated alone.
    segments = [[" Branch A: the river.", " Branch B: the mill."],
                [" Then the morning.", " Then the evening."],
                [" Short answer:", " Long answer:"]]  # fmt: skip
    tok = irt.tokenizer
    prompts = []
    for a in segments[0]:
        for b in segments[1]:
            for c in segments[2]:
                prompts.append([t for part in (root, a, b, c)
                                for t in tok.encode(part, add_special_tokens=False)])  # fmt: skip
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    want = [o.text for o in LLM(str(tiny_dir), num_pages=128).generate(prompts, params)]
    assert got["leaves"] == want
    assert free_pages(irt) == free0


def test_the_naive_baselines_do_the_same_work_without_sharing(irt: Any) -> None:
    """``separate`` (prefix_tree) and ``share: false`` (the thought apps) are the
    benchmarks' baselines: the same results, every branch computed from its start."""
    irt.query(lambda: irt.prefix_cache.clear())
    root = "An old story told three ways. " * 8
    root_tokens = len(irt.tokenizer.encode(root, add_special_tokens=False))
    tree = program(irt, "prefix_tree")
    t0 = _computed(irt)
    shared = json.loads(reply(irt, tree, root, "6"))
    t1 = _computed(irt)
    irt.query(lambda: irt.prefix_cache.clear())
    separate = json.loads(reply(irt, tree, root, "6", "separate"))
    t2 = _computed(irt)
    assert separate["leaves"] == shared["leaves"]
    assert separate["pages_used"] == separate["pages_separate"]  # nothing shared
    assert t2 - t1 >= 8 * root_tokens > 2 * (t1 - t0)
    tot = program(irt, "tree_of_thought")
    cfg = {"problem": root, "depth": 2, "breadth": 2, "keep": 1, "tokens": 4}
    t0 = _computed(irt)
    json.loads(reply(irt, tot, json.dumps(cfg)))
    t1 = _computed(irt)
    irt.query(lambda: irt.prefix_cache.clear())
    naive = json.loads(reply(irt, tot, json.dumps({**cfg, "share": False})))
    t2 = _computed(irt)
    assert naive["contexts"] == 1 + 2 + 2 and len(naive["levels"]) == 2
    # The first level's two copies each compute the problem (the second level's copies
    # find the first's pages in the automatic prefix cache); the forks compute it once.
    assert t2 - t1 >= 2 * root_tokens and t2 - t1 > 1.5 * (t1 - t0)
