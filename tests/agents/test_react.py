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


def test_a_shared_system_prompt_is_computed_once(art: Any, tools: ToolServer) -> None:
    prog = program(art, "agent_react")
    steps = [["/fact?key=loom-page-size"]]
    n = 4

    def tokens_for(**kw: Any) -> int:
        before = art.worker.stats().num_tokens
        results = run_agents(art, prog, [config(tools, steps, **kw) for _ in range(n)])
        assert all(r["tool_calls"] == 1 for r in results)
        return int(art.worker.stats().num_tokens - before)

    private = tokens_for()
    shared = tokens_for(share_prefix="test-react-system")
    again = tokens_for(share_prefix="test-react-system")  # the export outlives its builder
    system = len(art.tokenizer.encode(SYSTEM, add_special_tokens=False))
    assert system > 300
    # Private: n copies of the system prompt; shared: one (plus each agent's last,
    # partly filled page of it, recomputed); then none.
    assert private - shared >= (n - 1) * system - n * 16
    assert shared - again >= system - 16
    assert pages_in_use(art) > 0  # the persistent export
    drop_exports(art)
    assert pages_in_use(art) == 0
