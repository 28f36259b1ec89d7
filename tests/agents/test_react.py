"""The ReAct agent end to end against the real tool server: its tool calls, its errors,
its shared system prompt and its KV pages."""

from __future__ import annotations

import json
from typing import Any

from loom.testing.tool_server import ToolServer
from tests.agents.conftest import drop_exports, pages_in_use, program

SYSTEM = "You are an agent. " + " ".join(f"Tool {i}: does thing number {i}." for i in range(40))


def config(tools: ToolServer, steps: list[list[str]], **kw: Any) -> str:
    cfg = {
        "system": SYSTEM, "question": "Where is the old mill?", "step_tokens": 8,
        "answer_tokens": 4, "steps": [[tools.url + u for u in s] for s in steps],
        "share_prefix": None, "overlap": False, "concurrent_tools": False,
    }  # fmt: skip
    cfg.update(kw)
    return json.dumps(cfg)


def run_agents(rt: Any, prog: str, configs: list[str]) -> list[dict[str, Any]]:
    handles = [rt.launch(prog, [c]) for c in configs]
    out = []
    for h in handles:
        result = h.wait(120)
        assert result.ok, result.error
        out.append(json.loads(h.recv(5)))
    return out


def test_react_calls_every_tool_of_its_plan(art: Any, tools: ToolServer) -> None:
    prog = program(art, "agent_react")
    before = dict(tools.calls)
    steps = [["/search?q=river+mill"], ["/calc?expr=6*7", "/fact?key=capital-of-france"]]
    cfgs = [config(tools, steps, overlap=o, concurrent_tools=o) for o in (False, True)]
    for r in run_agents(art, prog, cfgs):
        assert r["tool_calls"] == 3 and r["tool_errors"] == 0
        assert 0 < r["generated"] <= 2 * 8
        assert r["answer"]
    for tool in ("search", "calc", "fact"):
        assert tools.calls[tool] - before.get(tool, 0) == 2
    assert pages_in_use(art) == 0


def test_a_failing_or_slow_tool_is_an_observation_not_a_crash(art: Any, tools: ToolServer) -> None:
    prog = program(art, "agent_react")
    steps = [["/fail"], ["/search?q=x&delay_ms=2500"], ["/calc?expr=1/0"], ["/fact?key=nope"]]
    (r,) = run_agents(art, prog, [config(tools, steps, concurrent_tools=True)])
    # A 500, a timeout (the runtime's is 1 s here), a 400 and a 404: four errors, and the
    # agent still answered.
    assert r["tool_calls"] == 4 and r["tool_errors"] == 4
    assert r["answer"]
    assert pages_in_use(art) == 0


def _tokens_for(art: Any, prog: str, configs: list[str]) -> int:
    """Tokens the engine computed for ``configs``, run at once from an empty prefix cache."""
    art.query(lambda: art.prefix_cache.clear())
    before = art.worker.stats().num_tokens
    results = run_agents(art, prog, configs)
    assert all(r["tool_calls"] == 1 for r in results)
    return int(art.worker.stats().num_tokens - before)


def test_a_shared_system_prompt_is_computed_once(art: Any, tools: ToolServer) -> None:
    prog = program(art, "agent_react")
    steps = [["/fact?key=loom-page-size"]]
    n = 4
    system = len(art.tokenizer.encode(SYSTEM, add_special_tokens=False))
    assert system > 300
    cfgs = [config(tools, steps, share_prefix="test-react") for _ in range(n)]
    shared = _tokens_for(art, prog, cfgs)
    again = _tokens_for(art, prog, cfgs)
    # The first agent computes the system prompt and exports it, the others import it,
    # each recomputing the export's last, partly filled page; the export outlives its
    # builder, so next time no agent computes it: one copy was computed, not n.
    assert system - 16 <= shared - again <= system + 16
    assert pages_in_use(art) > 0  # the persistent export
    drop_exports(art)
    assert pages_in_use(art) == 0


def test_naive_agents_share_the_system_prompt_through_the_prefix_cache(
    art: Any, tools: ToolServer
) -> None:
    # No explicit sharing: one agent after another, each filling the system prompt itself.
    prog = program(art, "agent_react")
    steps = [["/fact?key=loom-page-size"]]
    system = len(art.tokenizer.encode(SYSTEM, add_special_tokens=False))
    first = _tokens_for(art, prog, [config(tools, steps)])
    cached = art.query(lambda: art.stats.context_cached_tokens)
    before = art.worker.stats().num_tokens
    (r,) = run_agents(art, prog, [config(tools, steps)])  # the cache holds the prompt now
    second = art.worker.stats().num_tokens - before
    assert r["tool_calls"] == 1
    assert art.query(lambda: art.stats.context_cached_tokens) - cached >= system - 16
    assert first - second >= system - 16
    assert pages_in_use(art) == 0


def test_an_agent_drops_its_tool_docs_once_it_has_chosen_its_tools(
    art: Any, tools: ToolServer
) -> None:
    prog = program(art, "agent_react")
    steps = [["/search?q=mill"], ["/calc?expr=6*7"], ["/fact?key=capital-of-france"]]
    docs = " ".join(f"Tool t{i}: does thing number {i}." for i in range(30)) + "\n"
    kept, dropped = run_agents(art, prog, [
        config(tools, steps, system="You are an agent.\n", docs=docs, drop_docs=d)
        for d in (False, True)
    ])  # fmt: skip
    n_docs = len(art.tokenizer.encode(docs, add_special_tokens=False))
    assert kept["docs_pages_dropped"] == 0
    assert dropped["docs_pages_dropped"] >= n_docs // 16 - 2  # every page wholly docs
    assert dropped["tool_calls"] == kept["tool_calls"] == 3 and dropped["answer"]
    assert pages_in_use(art) == 0
