"""CodeAct and Swarm agents end to end against the real tool server."""

from __future__ import annotations

import json
from typing import Any

from loom.testing.tool_server import ToolServer
from tests.agents.conftest import drop_exports, pages_in_use, program


def run(rt: Any, prog: str, cfg: dict[str, Any]) -> dict[str, Any]:
    h = rt.launch(prog, [json.dumps(cfg)])
    result = h.wait(180)
    assert result.ok, result.error
    return json.loads(h.recv(5))  # type: ignore[no-any-return]


def test_codeact_runs_each_program_and_reads_failures(art: Any, tools: ToolServer) -> None:
    prog = program(art, "agent_codeact")
    before = tools.calls["run"]
    programs = [
        "print(6 * 7)",
        "raise SystemExit(3)",  # a failing program
        "import time\ntime.sleep(30)",  # over the runner's time limit (or the HTTP timeout)
    ]
    for overlap in (False, True):
        r = run(art, prog, {
            "system": "Write Python.\n", "question": "compute", "tools": tools.url,
            "step_tokens": 6, "answer_tokens": 3, "programs": programs,
            "share_prefix": None, "overlap": overlap,
        })  # fmt: skip
        assert r["runs"] == 3 and r["run_errors"] == 2
        assert r["answer"]
    assert tools.calls["run"] - before == 6
    assert pages_in_use(art) == 0


def test_swarm_hands_work_through_channels_in_order(art: Any, tools: ToolServer) -> None:
    prog = program(art, "agent_swarm")
    k = 3
    r = run(art, prog, {
        "system": "A team.\n", "goal": "describe the mill", "workers": k, "tokens": 4,
        "tools": tools.url, "share_prefix": "test-swarm-system", "swarm": "t1", "roles": "all",
    })  # fmt: skip
    events = [tuple(e) for e in r["events"]]
    at = {e: i for i, e in enumerate(events)}
    assert events[0] == ("planner", "plan", None) and events[-1] == ("planner", "final", None)
    assert r["final"]
    workers = {e[0] for e in events if e[0].startswith("worker")}
    assert len(workers) == k
    for t in range(k):
        # Every task goes planner -> a worker -> critic -> planner, in that order.
        (taker,) = [e for e in events if e[0].startswith("worker") and e[1:] == ("task", t)]
        assert at[("planner", "task", t)] < at[taker]
        assert at[taker] < at[(taker[0], "result", t)] < at[("critic", "result", t)]
        assert at[("critic", "review", t)] < at[("planner", "review", t)]
    drop_exports(art)
    assert pages_in_use(art) == 0


def test_swarm_roles_can_be_separate_instances(art: Any, tools: ToolServer) -> None:
    prog = program(art, "agent_swarm")
    base = {"system": "A team.\n", "goal": "g", "workers": 2, "tokens": 3, "tools": None,
            "share_prefix": None, "swarm": "t2"}  # fmt: skip
    planner = art.launch(prog, [json.dumps({**base, "roles": "planner"})])
    others = [art.launch(prog, [json.dumps({**base, "roles": role})])
              for role in ("worker", "worker", "critic")]  # fmt: skip
    for h in [*others, planner]:
        result = h.wait(180)
        assert result.ok, result.error
    events = json.loads(planner.recv(5))["events"]
    assert [e[1] for e in events].count("review") == 2
    assert pages_in_use(art) == 0
