"""The engine worker, in a thread and in a real child process, against a direct ``Engine``."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import pytest
import torch

from loom.config import EngineConfig
from loom.engine.batch import ForwardBatch, OutputResult, OutputSpec, SamplerSpec
from loom.engine.engine import Engine
from loom.engine.page_pool import PagePool
from loom.engine.worker import (
    CopySlotsOp,
    EngineWorker,
    ExecuteOp,
    ResetPagesOp,
    SetLiveOp,
    SubprocessWorker,
    WorkerOp,
    start_worker,
)
from loom.errors import LoomError, ModelLoadError, RequestError
from tests.helpers import single_seq_batch

TIMEOUT_S = 60.0  # generous: only reached when something is broken
PROMPT = [5, 17, 42, 7, 99, 3, 250, 11, 64, 8, 300, 21, 9, 77]  # 14 tokens: decode crosses a page
DECODE_STEPS = 4
Mode = Literal["thread", "process"]


def greedy_outputs(rows: list[int]) -> list[OutputSpec]:
    return [OutputSpec(r, sampler=SamplerSpec(), logprobs=2, top_k_dist=3) for r in rows]


class Driver:
    """A worker plus an ``on_ready`` event, with a blocking ``run`` for tests."""

    def __init__(self, worker: EngineWorker, ready: threading.Event) -> None:
        self.worker, self.ready = worker, ready
        self.results: dict[int, object] = {}

    def wait(self, op_ids: list[int]) -> list[object]:
        deadline = time.monotonic() + TIMEOUT_S
        while not all(i in self.results for i in op_ids):
            # Clear before draining: a result landing after the drain sets it again.
            self.ready.clear()
            for op_id, result in self.worker.drain():
                assert op_id not in self.results, f"op {op_id} resolved twice"
                self.results[op_id] = result
            if all(i in self.results for i in op_ids):
                break
            assert self.ready.wait(max(0.0, deadline - time.monotonic())), "on_ready never came"
        return [self.results.pop(i) for i in op_ids]

    def run(self, *ops: WorkerOp) -> list[object]:
        """Submit all ops back to back (no waiting in between), then wait for all of them."""
        return self.wait([self.worker.submit(op) for op in ops])


def start(config: EngineConfig, mode: Mode, idle_spin_s: float | None = None) -> Driver:
    ready = threading.Event()
    # The child runs as many torch threads as this process (where the direct engine runs),
    # whatever an earlier engine's thread governor left it at.
    worker = start_worker(config, mode=mode, on_ready=ready.set, idle_spin_s=idle_spin_s,
                          threads=torch.get_num_threads())  # fmt: skip
    return Driver(worker, ready)


@pytest.fixture(scope="module")
def config(tiny_dir: Path) -> EngineConfig:
    # A fixed thread count: results are compared bit for bit, and kernels split their
    # work by thread (the thread governor would react to this process's own load).
    return EngineConfig(model=str(tiny_dir), kv_cache_memory_mb=2, adapt_threads=False)


@pytest.fixture(scope="module")
def engine(config: EngineConfig) -> Engine:
    return Engine(config)


@pytest.fixture(scope="module", params=["thread", "process", "spinning"])
def driver(request: pytest.FixtureRequest, config: EngineConfig) -> Iterator[Driver]:
    if request.param == "spinning":  # a process worker that polls 50 ms for each next op
        d = start(config, "process", idle_spin_s=0.05)
    else:
        d = start(config, request.param)
    yield d
    d.worker.close()


def direct(engine: Engine) -> Callable[[ForwardBatch, list[int]], list[OutputResult]]:
    def execute(batch: ForwardBatch, fresh: list[int]) -> list[OutputResult]:
        engine.runner.cache.reset_pages(fresh)
        return engine.execute(batch)

    return execute


def via_worker(d: Driver) -> Callable[[ForwardBatch, list[int]], list[OutputResult]]:
    def execute(batch: ForwardBatch, fresh: list[int]) -> list[OutputResult]:
        (result,) = d.run(ExecuteOp(batch, fresh))
        assert isinstance(result, list), result
        return result

    return execute


def prefill_and_decode(
    execute: Callable[[ForwardBatch, list[int]], list[OutputResult]], pool: PagePool
) -> list[list[OutputResult]]:
    """Greedy prefill of PROMPT, then DECODE_STEPS one-token steps; pages from ``pool``."""
    ps = pool.page_size
    pages = pool.allocate(pool.pages_for(len(PROMPT)))
    n = len(PROMPT)
    batch = single_seq_batch(PROMPT, list(range(n)), pages, n, ps)
    batch.outputs = greedy_outputs(list(range(n)))  # every row: logits of the whole prompt
    steps = [execute(batch, pool.drain_fresh())]
    for _ in range(DECODE_STEPS):
        token = steps[-1][-1].token
        assert token is not None
        if pool.pages_for(n + 1) > len(pages):
            pages += pool.allocate(1)
        batch = single_seq_batch([token], [n], pages, n + 1, ps)
        batch.outputs = greedy_outputs([0])
        steps.append(execute(batch, pool.drain_fresh()))
        n += 1
    pool.free(pages)
    return steps


def test_info_matches_the_engine(driver: Driver, engine: Engine, tiny_dir: Path) -> None:
    info = driver.worker.info
    assert info.model_dir == str(tiny_dir)
    assert (info.num_pages, info.page_size) == (engine.pool.num_pages, engine.pool.page_size)
    assert info.vocab_size == engine.model_config.vocab_size
    assert info.max_model_len == engine.max_model_len
    assert set(info.eos_token_ids) == engine.scheduler.outputs.eos_token_ids


def test_same_results_as_direct_execute(driver: Driver, engine: Engine) -> None:
    info = driver.worker.info
    before = driver.worker.stats()
    want = prefill_and_decode(direct(engine), PagePool(info.num_pages, info.page_size))
    got = prefill_and_decode(via_worker(driver), PagePool(info.num_pages, info.page_size))
    assert got == want  # bit-identical: same weights, same ops, same thread count
    assert all(r.token is not None and r.top_logprobs for step in got for r in step)
    # The worker saw exactly these batches: one prefill of the prompt, then 1-token decodes.
    after = driver.worker.stats()
    assert after.num_steps - before.num_steps == 1 + DECODE_STEPS
    assert after.num_tokens - before.num_tokens == len(PROMPT) + DECODE_STEPS
    assert after.recent_batches[-(1 + DECODE_STEPS) :] == [(1, len(PROMPT))] + [(1, 1)] * 4


def test_ops_run_in_submission_order(driver: Driver, engine: Engine) -> None:
    """Prefill into page A; then, submitted back to back: reset B, copy A -> B, hide one
    slot of B, decode on B. The decode must see the copy and the mask: it equals the same
    decode on A (with the same slot hidden) run directly."""
    info = driver.worker.info
    n, ps = 10, info.page_size
    prefill = single_seq_batch(PROMPT[:n], list(range(n)), [0], n, ps)
    prefill.outputs = []
    live = [i != 3 for i in range(ps)]

    def decode_on(page: int) -> ForwardBatch:
        batch = single_seq_batch([PROMPT[n]], [n], [page], n + 1, ps)
        batch.outputs = greedy_outputs([0])
        return batch

    engine.runner.cache.reset_pages([0])
    engine.execute(prefill)
    engine.runner.cache.set_live(0, live)
    want = engine.execute(decode_on(0))

    a, b = 5, 9  # any two pages: the test plays the runtime's page bookkeeping itself
    prefill.page_tables = [[a]]
    results = driver.run(
        ExecuteOp(prefill, [a]),
        ResetPagesOp([b]),
        CopySlotsOp(src_page=a, dst_page=b, src_offset=0, dst_offset=0, size=n),
        SetLiveOp(b, live),
        ExecuteOp(decode_on(b), []),
    )
    assert results == [[], None, None, None, want]


def test_bad_ops_fail_alone(driver: Driver) -> None:
    info = driver.worker.info
    ps, vocab = info.page_size, info.vocab_size

    def batch(token: int = 5, sampler: SamplerSpec | None = None) -> ForwardBatch:
        b = single_seq_batch([token], [0], [1], 1, ps)
        b.outputs = [OutputSpec(0, sampler=sampler or SamplerSpec())]
        return b

    results = driver.run(
        ExecuteOp(batch(token=vocab), [1]),  # token id out of range (a structural error)
        ExecuteOp(batch(sampler=SamplerSpec(temperature=-1.0)), [1]),  # bad sampler
        ExecuteOp(batch(), [info.num_pages]),  # fresh page out of range
        CopySlotsOp(0, 1, 10, 0, ps),  # past the end of the source page
        SetLiveOp(1, [True]),  # one flag for a 16-slot page
        ResetPagesOp([-1]),
        ExecuteOp(batch(), [1]),  # ... and the worker still serves
    )
    for result in results[:-1]:
        assert isinstance(result, RequestError), result
    assert "token id out of range" in str(results[0])
    assert "temperature" in str(results[1])
    good = results[-1]
    assert isinstance(good, list) and isinstance(good[0], OutputResult)
    assert good[0].token is not None


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_close_finishes_submitted_ops_and_is_idempotent(config: EngineConfig, mode: Mode) -> None:
    d = start(config, mode)
    op_id = d.worker.submit(SetLiveOp(0, [True] * d.worker.info.page_size))
    d.worker.close()  # runs what was submitted, then stops
    d.worker.close()
    (later,) = d.run(ResetPagesOp([0]))  # resolves at once
    assert d.wait([op_id]) == [None]
    assert isinstance(later, LoomError) and "closed" in str(later)
    with pytest.raises(LoomError, match="closed"):
        d.worker.stats()


def test_killed_child_fails_pending_and_later_ops(config: EngineConfig) -> None:
    d = start(config, "process")
    worker = d.worker
    assert isinstance(worker, SubprocessWorker) and worker.pid is not None
    batch = single_seq_batch([5, 6], [0, 1], [0], 2, worker.info.page_size)
    batch.outputs = []
    (ok,) = d.run(ExecuteOp(batch, [0]))
    assert ok == []
    # Stop the child first so the ops below are surely still pending when it dies.
    os.kill(worker.pid, signal.SIGSTOP)
    pending = [worker.submit(ExecuteOp(batch, [0])) for _ in range(3)]
    os.kill(worker.pid, signal.SIGKILL)
    results = d.wait(pending)
    assert all(isinstance(r, LoomError) and "engine worker died" in str(r) for r in results)
    assert "SIGKILL" in str(results[0])
    (later,) = d.run(ResetPagesOp([0]))
    assert isinstance(later, LoomError) and "engine worker died" in str(later)
    with pytest.raises(LoomError, match="engine worker died"):
        worker.stats()
    worker.close()
    worker.close()


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_bad_model_dir_is_a_model_load_error(tmp_path: Path, mode: Mode) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        start_worker(EngineConfig(model=str(tmp_path / "missing")), mode=mode)


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_other_startup_failures_become_model_load_errors(tiny_dir: Path, mode: Mode) -> None:
    bad = EngineConfig(model=str(tiny_dir), dtype="int3")  # the loader raises ValueError
    with pytest.raises(ModelLoadError, match="failed to start: ValueError: unknown dtype"):
        start_worker(bad, mode=mode)


def test_compact_execute_ops_cross_the_pipe_unchanged() -> None:
    # A decode step's op crosses as plain tuples; everything it carries must come back:
    # masks, logit masks, seeds, several samplers (shared ones stay equal), passes ahead.
    from loom.engine.worker.wire import _decode_execute, _encode_execute

    greedy, hot = SamplerSpec(), SamplerSpec(temperature=0.8, top_k=40, top_p=0.9, seed=7)
    batch = ForwardBatch(
        token_ids=[5, 6, 7],
        positions=[3, 4, 9],
        seq_indptr=[0, 2, 3],
        page_tables=[[4, 1], [9]],
        last_page_lens=[3, 10],
        outputs=[
            OutputSpec(1, greedy, top_k_dist=3),
            OutputSpec(2, hot, logprobs=2, logit_mask=[10, 5, 240]),
            OutputSpec(0, None, top_k_dist=5, logit_bias=((3, 4), (1.5, -2.0)), state=17),
        ],
        masks=[[[4], [5]], None],
    )
    op = ExecuteOp(batch, fresh_pages=[9], chain=[(2, 0)])
    # Every field is set somewhere above with a value other than its default.
    for f in dataclasses.fields(OutputSpec):
        assert any(getattr(o, f.name) != f.default for o in batch.outputs), f.name
    back = _decode_execute(_encode_execute(op))
    assert back == op
    assert back.batch.outputs[1].sampler == hot and back.batch.outputs[1].sampler.seed == 7


@pytest.mark.parametrize("size", [0, 200, (1 << 16) - 1, 1 << 16, 300_000])
def test_ops_are_framed_as_send_bytes_frames_them(size: int) -> None:
    # Small ops are framed by hand and written with one system call; the worker reads
    # every op with ``recv_bytes``, so both paths must give it header + payload intact.
    import multiprocessing

    from loom.engine.worker.wire import _HEADER, _write_message

    r, w = multiprocessing.Pipe(duplex=False)
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    got: list[bytes] = []
    # A reader thread: a frame larger than the pipe's buffer blocks until it is read.
    reader = threading.Thread(target=lambda: got.extend([r.recv_bytes(), r.recv_bytes()]))
    reader.start()
    try:
        _write_message(w, w.fileno(), b"x", 12345, payload)
        _write_message(w, w.fileno(), b"s", 2**63, b"")  # the next frame starts cleanly
    finally:
        reader.join(TIMEOUT_S)
        r.close()
        w.close()
    assert got == [_HEADER.pack(b"x", 12345) + payload, _HEADER.pack(b"s", 2**63)]
