"""The wasmtime plumbing with hand-written core guests (WAT): fibers, epochs, limits."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
import wasmtime

from loom.runtime.wasm import ffi as wasm_ffi

GUEST = """
(module
  (import "host" "wait" (func $wait (param i32) (result i32)))
  (memory 1)
  ;; sum(n) = wait(0) + wait(1) + ... + wait(n - 1): every call may suspend the guest.
  (func (export "sum") (param $n i32) (result i32)
    (local $i i32) (local $acc i32)
    (block $done (loop $l
      (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
      (local.set $acc (i32.add (local.get $acc) (call $wait (local.get $i))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $l)))
    (local.get $acc))
  (func (export "spin") (param i32) (result i32)
    (loop $l (br $l))
    (i32.const 0))
  (func (export "grow") (param $pages i32) (result i32)
    (memory.grow (local.get $pages))))
"""


class Slot:
    """A pending host result, answered by the test."""

    def __init__(self, x: int) -> None:
        self.x = x
        self.val: int | None = None

    def ready(self) -> bool:
        return self.val is not None

    def value(self) -> int:
        assert self.val is not None
        return self.val


Guest = tuple[wasm_ffi.CoreLinker, wasmtime.Module, list[Slot]]


@pytest.fixture(scope="module")
def engine() -> Iterator[wasm_ffi.WasmEngine]:
    eng = wasm_ffi.WasmEngine(epoch_interruption=True)
    stop = threading.Event()

    def tick() -> None:  # the runtime's epoch ticker, faster
        while not stop.wait(0.002):
            eng.increment_epoch()

    t = threading.Thread(target=tick, daemon=True)
    t.start()
    yield eng
    stop.set()
    t.join()


@pytest.fixture(scope="module")
def guest(engine: wasm_ffi.WasmEngine) -> Guest:
    linker = wasm_ffi.CoreLinker(engine)
    pending: list[Slot] = []

    def wait(x: int) -> Slot:
        slot = Slot(x)
        pending.append(slot)
        return slot

    linker.add_async_func("host", "wait", wait)
    return linker, wasmtime.Module(engine.engine, GUEST), pending


def _start(engine: wasm_ffi.WasmEngine, guest: Guest, name: str, arg: int) -> wasm_ffi.CallFuture:
    linker, module, _ = guest
    store = wasm_ffi.GuestStore(engine, memory_limit=4 * 65536)
    fut = linker.call_async(store, linker.instantiate(store, module), name, arg)
    fut.store = store  # type: ignore[attr-defined]  # keep the store alive with the call
    return fut


def _poll_until(fut: wasm_ffi.CallFuture, cond: Callable[[], bool] | None = None) -> bool:
    """Poll through epoch yields (a slice can end at any instruction) until ``fut`` is
    done or ``cond()`` holds; True when done."""
    for _ in range(10_000):
        if fut.poll():
            return True
        if cond is not None and cond():
            return False
    raise AssertionError("the guest made no progress")


def test_a_waiting_host_call_suspends_only_its_guest(
    engine: wasm_ffi.WasmEngine, guest: Guest
) -> None:
    _, _, pending = guest
    pending.clear()
    a, b = _start(engine, guest, "sum", 3), _start(engine, guest, "sum", 3)
    # Both park on their first call (polling again while parked changes nothing).
    assert not _poll_until(a, lambda: len(pending) == 1)
    assert not _poll_until(b, lambda: len(pending) == 2)
    assert not a.poll() and not b.poll() and [s.x for s in pending] == [0, 0]
    rounds = 0
    while not (a.done and b.done):
        # Answer in reverse order of asking: each guest resumes on its own fiber.
        for slot in reversed(pending):
            slot.val = slot.x * 10 + 1
        pending.clear()
        _poll_until(b, lambda: len(pending) >= 1)
        _poll_until(a, lambda: len(pending) >= 2)
        rounds += 1
        assert rounds < 10
    assert a.results[0].of.i32 == b.results[0].of.i32 == 1 + 11 + 21
    assert rounds == 3


def test_a_fresh_slice_lets_a_long_waiting_guest_run_on(
    engine: wasm_ffi.WasmEngine, guest: Guest
) -> None:
    """A guest parked past its deadline yields at its first loop back-edge once answered,
    unless it gets a fresh slice before the poll (what the runtime does)."""
    linker, module, pending = guest
    for fresh in (False, True):
        pending.clear()
        store = wasm_ffi.GuestStore(engine, memory_limit=4 * 65536, slice_ticks=5)
        fut = linker.call_async(store, linker.instantiate(store, module), "sum", 3)
        assert not _poll_until(fut, lambda: len(pending) == 1)
        time.sleep(0.04)  # 20 ticks of 2 ms: the 5-tick deadline is long past
        pending[0].val = 1
        if fresh:
            store.fresh_slice()
        assert not fut.poll()
        assert len(pending) == (2 if fresh else 1)  # reached its next call, or yielded
        fut.cancel()


def test_a_spinning_guest_yields_at_every_epoch(engine: wasm_ffi.WasmEngine, guest: Guest) -> None:
    spin = _start(engine, guest, "spin", 0)
    for _ in range(5):
        t0 = time.perf_counter()
        assert not spin.poll()  # yielded at its deadline instead of running forever
        assert time.perf_counter() - t0 < 2.0
    spin.cancel()
    assert spin.done
    # The engine and other guests are unaffected.
    _, _, pending = guest
    pending.clear()
    other = _start(engine, guest, "sum", 1)
    assert not _poll_until(other, lambda: len(pending) == 1)
    pending[0].val = 5
    assert _poll_until(other) and other.results[0].of.i32 == 5


def test_memory_growth_past_the_cap_fails(engine: wasm_ffi.WasmEngine, guest: Guest) -> None:
    grow = _start(engine, guest, "grow", 2)  # 1 + 2 pages <= the 4-page cap
    assert _poll_until(grow) and grow.results[0].of.i32 == 1  # the old size
    grow = _start(engine, guest, "grow", 100)
    assert _poll_until(grow) and grow.results[0].of.i32 == -1  # refused by the store limit
