"""A generation chunk hands each step's tokens on at the right moment: on a CPU as soon as
the step is read back; on a GPU after the next step is launched, so the hand-off overlaps
the pass. Both orders give the same tokens and the same steps."""

from __future__ import annotations

from typing import Any

from loom.config import EngineConfig
from loom.engine.batch import ForwardBatch, OutputSpec, SamplerSpec
from loom.engine.worker.executor import _OpRunner
from loom.engine.worker.ops import ChunkStep, ExecuteOp, GenPlan


def run_chunk(overlap: bool) -> tuple[Any, list[ChunkStep], list[str]]:
    runner = _OpRunner(EngineConfig(num_pages=8))
    runner.overlap_progress = overlap
    events: list[str] = []
    steps: list[ChunkStep] = []

    def progress(step: ChunkStep) -> None:
        events.append("progress")
        steps.append(step)

    launch = runner.engine.launch

    def traced_launch(batch: ForwardBatch) -> Any:
        events.append("launch")
        return launch(batch)

    runner.progress = progress
    runner.engine.launch = traced_launch  # type: ignore[method-assign]
    greedy = SamplerSpec()
    batch = ForwardBatch(
        token_ids=[5, 6, 7, 8, 9, 20, 21, 22], positions=[0, 1, 2, 3, 4, 0, 1, 2],
        seq_indptr=[0, 5, 8], page_tables=[[0], [1]], last_page_lens=[5, 3],
        outputs=[OutputSpec(4, greedy), OutputSpec(7, greedy)],
    )  # fmt: skip
    plans = [
        GenPlan(0, [0], 5, 5, greedy, 1, frozenset(), 6, None),
        GenPlan(1, [1], 3, 3, greedy, 1, frozenset(), 4, None),
    ]
    result = runner.run(ExecuteOp(batch, fresh_pages=[0, 1], plans=plans))
    return result, steps, events


def test_chunk_steps_go_out_after_the_next_launch_on_a_gpu() -> None:
    (res_cpu, tokens_cpu), steps_cpu, events_cpu = run_chunk(overlap=False)
    (res_gpu, tokens_gpu), steps_gpu, events_gpu = run_chunk(overlap=True)
    assert [len(t) for t in tokens_cpu] == [6, 4]
    assert tokens_gpu == tokens_cpu
    assert [r.token for r in res_gpu] == [r.token for r in res_cpu]
    assert [(s.step, s.tokens) for s in steps_gpu] == [(s.step, s.tokens) for s in steps_cpu]
    # CPU: the step's batch, its results, then launch and hand-off in turn.
    assert events_cpu == ["launch", "progress"] + ["launch", "progress"] * 6
    # GPU order: step k's tokens go out once step k + 1 is launched; the last after the loop.
    assert events_gpu == ["launch", "progress", "launch"] + ["launch", "progress"] * 5 + [
        "progress"
    ]
