"""A dead engine worker is noticed, reported and replaced: what it was running fails with
an error saying so (an inferlet's ``generate`` raises; it never returns empty text), and
the next request succeeds on a new worker."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.support import complete


@pytest.fixture(scope="module")
def prt(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A runtime whose engine runs in its own process (the one that gets killed)."""
    from loom.config import EngineConfig, RuntimeConfig
    from loom.runtime.runtime import start_runtime

    rt = start_runtime(EngineConfig(model=str(tiny_dir), num_pages=64), RuntimeConfig(),
                       worker_mode="process", pin_cpus=False,
                       cache_dir=tmp_path_factory.mktemp("worker-programs"))  # fmt: skip
    yield rt
    rt.close()


def kill_worker(rt: Any) -> None:
    os.kill(rt.worker.pid, signal.SIGKILL)


def restarted(rt: Any, n: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while rt.query(lambda: len(rt.supervisor.restarts)) < n:
        assert time.monotonic() < deadline, "the worker was not restarted"
        time.sleep(0.05)


def test_a_killed_worker_fails_its_work_clearly_and_is_replaced(prt: Any) -> None:
    done, box = complete(prt, 8)
    assert done.wait(60) and box[0].error is None
    first = threading.Event()
    done, box = complete(prt, 100_000, first)  # running when the worker dies
    assert first.wait(60)
    old_pid = prt.worker.pid
    kill_worker(prt)
    assert done.wait(60)
    assert box[0].finish_reason == "error" and "engine worker died" in (box[0].error or "")
    restarted(prt, 1)
    assert prt.worker.pid != old_pid and prt.supervisor.status == "ok"
    assert prt.query(lambda: prt.pool.num_available()) == prt.pool.num_pages  # nothing held
    done, box = complete(prt, 8)  # the next request succeeds
    assert done.wait(60) and box[0].error is None and len(box[0].tokens) == 8


def test_an_inferlet_running_when_the_worker_dies_ends_saying_so(
    prt: Any, sdkkit_wasm: bytes
) -> None:
    program = prt.add_program(sdkkit_wasm)
    before = len(prt.supervisor.restarts)
    h = prt.launch(program, ["fast", "Once upon a time", "100000"])
    deadline = time.monotonic() + 60
    while not h.sampled and time.monotonic() < deadline:
        time.sleep(0.01)
    kill_worker(prt)
    end = h.wait(60)
    assert not end.ok and "engine worker died" in (end.error or "")
    restarted(prt, before + 1)
