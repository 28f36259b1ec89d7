"""Core placement: the plan for a set of cores, and a real runtime's threads and engine
process kept where the plan puts them."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from loom.config import EngineConfig
from loom.engine.worker.cpu_placement import (
    UNPINNED,
    CpuPlacement,
    allowed_cpus,
    pin_current_thread,
    plan,
)


def test_the_first_core_goes_to_the_runtime_the_rest_to_the_engine() -> None:
    assert plan({3, 0, 2, 1}) == CpuPlacement(0, frozenset({1, 2, 3}))
    assert plan([7, 5]) == CpuPlacement(5, frozenset({7}))
    assert plan({4}) is UNPINNED  # one core: nothing to split
    assert plan([]) is UNPINNED
    assert plan({0, 1, 2, 3, 5}).describe() == "runtime on core 0, engine on cores 1-3,5"
    assert UNPINNED.describe() == "cores not pinned"
    assert plan({0, 1}).describe() == "runtime on core 0, engine on core 1"


def test_pinning_a_thread_leaves_the_others_where_they_were() -> None:
    before = allowed_cpus()
    core = max(before)
    seen: list[set[int]] = []

    def body() -> None:
        pin_current_thread({core})
        seen.append(set(os.sched_getaffinity(0)))
        pin_current_thread(None)  # None: nothing changes
        seen.append(set(os.sched_getaffinity(0)))

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == [{core}, {core}]
    assert allowed_cpus() == before


def test_a_core_that_cannot_be_had_leaves_the_thread_where_it_was() -> None:
    seen: list[set[int]] = []

    def body() -> None:
        pin_current_thread({10_000})  # no such core: placement never fails a start
        seen.append(set(os.sched_getaffinity(0)))

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == [allowed_cpus()]


def test_the_runtime_thread_reader_and_engine_process_run_where_placed(
    tiny_dir: Path, program_cache: Path, testkit_wasm: bytes, rt: Any, testkit: str
) -> None:
    from loom.engine.worker import SubprocessWorker
    from loom.runtime.runtime import start_runtime

    # The reference: the same decode on the unpinned in-process runtime of the module.
    ref = rt.launch(testkit, ["decode", "5,6,7", "4"])
    assert ref.wait(60).ok
    want = json.loads(ref.recv(1))
    cores = sorted(allowed_cpus())
    pinned = start_runtime(
        EngineConfig(model=str(tiny_dir), num_pages=16), cache_dir=program_cache, pin_cpus=True
    )
    try:
        h = pinned.launch(pinned.add_program(testkit_wasm), ["decode", "5,6,7", "4"])
        assert h.wait(60).ok
        assert json.loads(h.recv(1)) == want
        worker = pinned.worker
        assert isinstance(worker, SubprocessWorker) and worker.pid is not None
        runtime_thread = pinned.query(lambda: set(os.sched_getaffinity(0)))
        reader = set(os.sched_getaffinity(worker._reader.native_id or 0))
        engine = set(os.sched_getaffinity(worker.pid))
        if len(cores) >= 2:
            assert pinned.placement == CpuPlacement(cores[0], frozenset(cores[1:]))
            assert runtime_thread == reader == {cores[0]}
            assert engine == set(cores[1:])
        else:  # one core: nothing pinned, everything where the process may run
            assert pinned.placement is UNPINNED
            assert runtime_thread == reader == engine == set(cores)
        assert allowed_cpus() == set(cores)  # the caller's own thread is not moved
    finally:
        pinned.close()


def test_a_worker_runs_where_placed_and_anywhere_unplaced(tiny_dir: Path) -> None:
    from loom.engine.worker import SubprocessWorker, start_worker

    cores = sorted(allowed_cpus())
    # Placed by hand, so that the plumbing is checked on a one-core machine too.
    placement = CpuPlacement(cores[-1], frozenset(cores[:1]))
    worker = start_worker(
        EngineConfig(model=str(tiny_dir), num_pages=16), mode="process", placement=placement
    )
    try:
        assert isinstance(worker, SubprocessWorker) and worker.pid is not None
        assert set(os.sched_getaffinity(worker.pid)) == {cores[0]}
        assert set(os.sched_getaffinity(worker._reader.native_id or 0)) == {cores[-1]}
    finally:
        worker.close()
    worker = start_worker(EngineConfig(model=str(tiny_dir), num_pages=16), mode="process")
    try:
        assert isinstance(worker, SubprocessWorker) and worker.pid is not None
        assert set(os.sched_getaffinity(worker.pid)) == set(cores)
        assert set(os.sched_getaffinity(worker._reader.native_id or 0)) == set(cores)
    finally:
        worker.close()
