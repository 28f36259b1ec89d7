"""Tree, graph, recursion and skeleton of thought: the fork/join structure each defines
runs concurrently (its branches share engine passes) and the shared problem statement is
computed once, not once per branch."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.inferlets.conftest import program, reply
from tests.runtime_helpers import free_pages

PROBLEM = "The old mill by the river grinds grain for three villages. " * 12

CASES = {
    # app: (config, the widest level of concurrent branches, check of the reply)
    "tree_of_thought": (
        {"problem": PROBLEM, "depth": 3, "breadth": 3, "keep": 2, "tokens": 6}, 6,
        lambda r: [len(lv) for lv in r["levels"]] == [3, 6, 6] and len(r["best"]) == 3
        and r["score"] == max(r["levels"][-1])
        and all(lv == sorted(lv, reverse=True) for lv in r["levels"]),
    ),
    "graph_of_thought": (
        {"problem": PROBLEM, "thoughts": 4, "tokens": 6}, 4,
        lambda r: r["levels"] == [4, 2, 1] and isinstance(r["answer"], str),
    ),
    "recursion_of_thought": (
        {"problem": PROBLEM, "depth": 2, "fanout": 2, "tokens": 6}, 4,
        lambda r: r["calls"] == [1, 2, 4] and isinstance(r["answer"], str),
    ),
    "skeleton_of_thought": (
        {"question": PROBLEM, "points": 4, "skeleton_tokens": 8, "tokens": 6}, 4,
        lambda r: len(r["points"]) == 4 and r["answer"].count("\n") == 3,
    ),
}  # fmt: skip


@pytest.mark.parametrize("app", sorted(CASES))
def test_branches_run_together_and_share_the_problem(irt: Any, app: str) -> None:
    cfg, widest, check = CASES[app]
    prog = program(irt, app)
    free0 = free_pages(irt)
    prompt_len = len(irt.tokenizer.encode(PROBLEM, add_special_tokens=False))
    assert prompt_len > 150
    irt.query(lambda: irt.prefix_cache.clear())  # the structure alone must share
    start = irt.query(lambda: len(irt.stats.batch_sizes))
    t0 = int(irt.worker.stats().num_tokens)
    got = json.loads(reply(irt, prog, json.dumps(cfg)))
    computed = int(irt.worker.stats().num_tokens) - t0
    assert check(got), got
    sizes = irt.query(lambda: list(irt.stats.batch_sizes)[start:])
    # Concurrent branches: the widest level's contexts decoded in the same passes.
    assert max(sizes) >= widest, sizes
    # Shared, not recomputed: the problem once, plus per context its own segment, a
    # partly filled page re-fed and what it generates. Separate prompts would compute
    # the problem once per context.
    contexts = int(got["contexts"])
    assert computed >= prompt_len
    assert computed <= prompt_len + int(got["generated"]) + 48 * contexts, (computed, contexts)
    assert computed < prompt_len * contexts / 2
    assert free_pages(irt) == free0
