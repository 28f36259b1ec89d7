"""The engine worker's ops-pipe reader: framing, end of input, polling only while idle."""

from __future__ import annotations

import multiprocessing.connection
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from loom.config import EngineConfig
from loom.engine.batch import OutputSpec, SamplerSpec
from loom.engine.worker import (
    IDLE_SPIN_S,
    ExecuteOp,
    SubprocessWorker,
    start_worker,
)
from loom.engine.worker.pipe_reader import SpinningPipeReader
from tests.helpers import single_seq_batch

TIMEOUT_S = 10.0  # generous: only reached when something is broken


class Reading:
    """A reader on its own thread over a real pipe, collecting what it delivers."""

    def __init__(self, spin_s: float) -> None:
        r, self.w = os.pipe()
        self.got: list[bytes | None] = []
        self.arrived = threading.Condition()
        self.reader = SpinningPipeReader(r, self._deliver, spin_s)
        self._r = r
        self.thread = threading.Thread(target=self.reader.run, daemon=True)
        self.thread.start()

    def _deliver(self, message: bytes | None) -> None:
        with self.arrived:
            self.got.append(message)
            self.arrived.notify_all()

    def wait_for(self, n: int) -> list[bytes | None]:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.got) >= n, TIMEOUT_S), self.got
            return list(self.got)

    def close(self) -> None:
        os.close(self.w)
        self.thread.join(TIMEOUT_S)
        assert not self.thread.is_alive()
        self.reader.close()
        os.close(self._r)


@pytest.fixture
def reading() -> Iterator[Callable[[float], Reading]]:
    made: list[Reading] = []

    def make(spin_s: float) -> Reading:
        made.append(Reading(spin_s))
        return made[-1]

    yield make
    for r in made:
        if r.thread.is_alive():
            r.close()


def eventually(check: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + TIMEOUT_S
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


@pytest.mark.parametrize("spin_s", [0.0, 5.0])
def test_messages_arrive_whole_and_in_order_then_the_end(
    reading: Callable[[float], Reading], spin_s: float
) -> None:
    r = reading(spin_s)
    r.reader.idle()
    # What Connection.send_bytes writes, from another thread: empty, small, more than a
    # pipe holds (so it arrives in pieces), and several in one write.
    sizes = [0, 7, 200_000, 3, 65_536]
    messages = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    send = multiprocessing.connection.Connection(os.dup(r.w), readable=False)

    def write() -> None:
        for m in messages[:3]:
            send.send_bytes(m)

    writer = threading.Thread(target=write)
    writer.start()
    writer.join(TIMEOUT_S)
    os.write(r.w, b"".join(struct.pack("!i", len(m)) + m for m in messages[3:]))
    assert r.wait_for(len(messages)) == messages
    send.close()
    r.close()  # the last writer gone: the end of input
    assert r.wait_for(len(messages) + 1)[-1] is None
    assert not r.thread.is_alive()


def test_a_long_length_frame_is_read(reading: Callable[[float], Reading]) -> None:
    # Connection frames a message of 2 GiB or more as -1 and an 8-byte length.
    r = reading(0.0)
    frame = struct.pack("!i", 2) + b"hi"
    # ... followed by half of a normal frame's header: the reader waits for the rest.
    os.write(r.w, struct.pack("!i", -1) + struct.pack("!Q", 5) + b"hello" + frame[:2])
    assert r.wait_for(1) == [b"hello"]
    os.write(r.w, frame[2:])
    assert r.wait_for(2) == [b"hello", b"hi"]


def test_polls_only_from_idle_until_the_next_message(
    reading: Callable[[float], Reading],
) -> None:
    r = reading(60.0)
    assert eventually(lambda: r.reader.sleeping)  # nothing asked for a window yet
    r.reader.idle()  # wakes the sleeping reader: it polls now
    assert eventually(lambda: not r.reader.sleeping)
    time.sleep(0.05)
    assert not r.reader.sleeping  # still polling within the window
    os.write(r.w, struct.pack("!i", 2) + b"op")
    assert r.wait_for(1) == [b"op"]
    assert eventually(lambda: r.reader.sleeping)  # busy consumer: the reader sleeps


def test_no_window_after_a_wait_that_outlasted_one(
    reading: Callable[[float], Reading],
) -> None:
    r = reading(0.5)
    r.reader.idle()
    assert eventually(lambda: not r.reader.sleeping)
    time.sleep(0.8)  # the window ends; the message comes later
    os.write(r.w, struct.pack("!i", 1) + b"a")
    assert r.wait_for(1) == [b"a"]
    assert eventually(lambda: r.reader.sleeping)
    r.reader.idle()  # the last wait was longer than a window: no polling now
    for _ in range(20):
        time.sleep(0.005)
        assert r.reader.sleeping
    os.write(r.w, struct.pack("!i", 1) + b"b")  # a short wait this time ...
    assert r.wait_for(2) == [b"a", b"b"]
    r.reader.idle()  # ... so the next one polls again
    assert eventually(lambda: not r.reader.sleeping)


def test_no_window_no_polling(reading: Callable[[float], Reading]) -> None:
    r = reading(0.0)
    r.reader.idle()
    assert eventually(lambda: r.reader.sleeping)
    os.write(r.w, struct.pack("!i", 1) + b"x")
    assert r.wait_for(1) == [b"x"]


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_an_idle_worker_stops_polling(tiny_dir: Path) -> None:
    """A worker told to poll 50 ms after each op answers correctly, and once idle uses
    next to no CPU: the window ends, the child sleeps."""
    ready = threading.Event()
    worker = start_worker(
        EngineConfig(model=str(tiny_dir), num_pages=16),
        mode="process",
        on_ready=ready.set,
        idle_spin_s=0.05,
    )
    try:
        assert isinstance(worker, SubprocessWorker) and worker.pid is not None
        assert worker.idle_spin_s == 0.05
        batch = single_seq_batch([5, 6, 7], [0, 1, 2], [0], 3, worker.info.page_size)
        batch.outputs = [OutputSpec(2, sampler=SamplerSpec())]  # greedy: the same each time
        tokens = []
        for _ in range(3):
            ready.clear()
            op_id = worker.submit(ExecuteOp(batch, []))
            assert ready.wait(TIMEOUT_S)
            ((done_id, result),) = worker.drain()
            assert done_id == op_id and isinstance(result, list) and len(result) == 1, result
            tokens.append(result[0].token)
        assert tokens[0] is not None and tokens == [tokens[0]] * 3
        time.sleep(0.2)  # past the window
        before = _cpu_s(worker.pid)
        time.sleep(1.0)
        assert _cpu_s(worker.pid) - before < 0.3  # a polling child would use ~1 s
    finally:
        worker.close()


def test_polling_is_on_only_where_the_engine_has_cores_of_its_own(tiny_dir: Path) -> None:
    from loom.engine.worker.cpu_placement import CpuPlacement

    with pytest.raises(ValueError, match="idle_spin_s"):
        SubprocessWorker(EngineConfig(model=str(tiny_dir)), idle_spin_s=-1.0)
    cores = sorted(os.sched_getaffinity(0))
    placed = start_worker(
        EngineConfig(model=str(tiny_dir), num_pages=16),
        mode="process",
        placement=CpuPlacement(cores[-1], frozenset(cores[:1])),
    )
    unplaced = start_worker(EngineConfig(model=str(tiny_dir), num_pages=16), mode="process")
    try:
        assert isinstance(placed, SubprocessWorker) and isinstance(unplaced, SubprocessWorker)
        assert placed.idle_spin_s == IDLE_SPIN_S > 0
        assert unplaced.idle_spin_s == 0.0
    finally:
        placed.close()
        unplaced.close()
