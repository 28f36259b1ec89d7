"""Guests' turns side by side on a pool of threads (``runtime/turns.py``): the same
results as turns one by one on the runtime thread, and host calls still one at a time."""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import wasmtime

from loom.runtime.turns import TurnPool, default_threads, turn_pool
from loom.runtime.wasm import ffi as wasm_ffi
from tests.runtime_helpers import start_test_runtime

CTX = ",".join(str(10 + i) for i in range(32))  # two full pages of context

CALLER = """
(module
  (import "host" "enter" (func $enter (param i32) (result i32)))
  (func (export "calls") (param $n i32) (result i32)
    (local $i i32) (local $acc i32)
    (block $done (loop $l
      (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
      (local.set $acc (i32.add (local.get $acc) (call $enter (local.get $i))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $l)))
    (local.get $acc)))
"""


@pytest.fixture(scope="module")
def pool_rt(tiny_dir: Path, program_cache: Path) -> Iterator[Any]:
    runtime = start_test_runtime(tiny_dir, program_cache, guest_threads=3)
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def pool_kit(pool_rt: Any, testkit_wasm: bytes) -> str:
    return pool_rt.add_program(testkit_wasm)  # type: ignore[no-any-return]


def _outputs(rt: Any, program: str, args: list[list[str]]) -> list[Any]:
    handles = rt.launch_batch(program, args)
    out = []
    for h in handles:
        out.append(json.loads(h.recv(timeout=60)))
        result = h.wait(60)
        assert result.ok, result.error
    return out


def test_turns_run_on_the_runtime_thread_unless_asked_and_small_machines_stay_serial() -> None:
    from loom.config import RuntimeConfig

    assert RuntimeConfig().guest_threads == 1 and turn_pool(1) is None
    # guest_threads=0: half the cores, at most 8, none below 4 cores
    assert default_threads(2) == 1 and default_threads(3) == 1
    assert default_threads(4) == 2 and default_threads(16) == 8 and default_threads(64) == 8
    with pytest.raises(ValueError):
        TurnPool(1)


def test_a_cohort_on_the_pool_decodes_as_one_by_one(
    rt: Any, testkit: str, pool_rt: Any, pool_kit: str
) -> None:
    pool = pool_rt.guests.turn_pool
    assert pool is not None and pool.threads == 3 and rt.guests.turn_pool is None
    rounds = pool.rounds
    args = [["decode", ",".join(str(5 + i + j) for j in range(4)), "4"] for i in range(9)]
    want = _outputs(rt, testkit, args)
    assert _outputs(pool_rt, pool_kit, args) == want
    assert pool.rounds > rounds  # the members' turns ran side by side


@pytest.mark.parametrize("mode", ["fork", "generate", "step-decode"])
def test_forks_generations_and_step_loops_on_the_pool_equal_one_by_one(
    rt: Any, testkit: str, pool_rt: Any, pool_kit: str, mode: str
) -> None:
    args = {
        "fork": [["fork", CTX]] * 4,
        "generate": [["generate", f"Once upon a time {i}", "7"] for i in range(6)],
        "step-decode": [["step-decode", "5,6,7,8", "5"]] * 6,
    }[mode]
    got, want = _outputs(pool_rt, pool_kit, args), _outputs(rt, testkit, args)
    if mode != "fork":
        assert got == want
        return
    # Distributions: batches of other compositions round differently in the last bits.
    for g, w in zip(got, want, strict=True):
        for (g_ids, g_probs), (w_ids, w_probs) in zip(
            [g["parent"], *g["forks"]], [w["parent"], *w["forks"]], strict=True
        ):
            assert g_ids[:5] == w_ids[:5]
            assert g_probs == pytest.approx(w_probs, rel=1e-4, abs=1e-6)


def test_a_spinning_guest_on_the_pool_ends_by_its_budget_and_holds_no_one(
    pool_rt: Any, pool_kit: str
) -> None:
    spinner, worker = pool_rt.launch_batch(pool_kit, [["spin"], ["decode", "5,6,7,8", "3"]])
    assert len(json.loads(worker.recv(timeout=60))) == 3
    assert worker.wait(60).ok
    result = spinner.wait(60)
    assert not result.ok and "CPU budget" in (result.error or "")


def test_host_calls_of_guests_running_side_by_side_never_overlap() -> None:
    """Four guests on four threads call a host function 200 times each; the function
    sleeps while it holds the host (the GIL is free then), so a second call entering it
    without the host lock would be seen."""
    engine = wasm_ffi.WasmEngine(epoch_interruption=False)
    linker = wasm_ffi.CoreLinker(engine)
    inside, most, threads = 0, 0, set()

    def enter(ctx: int, memory: Any, x: int) -> int:
        nonlocal inside, most
        inside += 1
        most = max(most, inside)
        threads.add(threading.get_ident())
        time.sleep(0.0001)
        inside -= 1
        return x

    linker.add_func("host", "enter", "i", "i", enter)
    module = wasmtime.Module(engine.engine, CALLER)
    stores = [wasm_ffi.GuestStore(engine, memory_limit=65536) for _ in range(4)]
    calls = [linker.call_async(s, linker.instantiate(s, module), "calls", 200) for s in stores]
    start = threading.Barrier(4)

    def drive(call: wasm_ffi.CallFuture) -> None:
        start.wait()
        while not call.poll():
            pass

    workers = [threading.Thread(target=drive, args=(c,)) for c in calls]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert all(c.done for c in calls)
    assert [c.results[0].of.i32 for c in calls] == [sum(range(200))] * 4
    assert len(threads) == 4 and most == 1


def test_a_guest_preempted_mid_submission_again_and_again_gets_one_more_slice_a_pass() -> None:
    """As on the runtime thread: one turn and one more for a half-submitted pass, never a
    loop that keeps the runtime from the engine while a guest keeps being preempted."""
    from types import SimpleNamespace

    from loom.config import RuntimeConfig
    from loom.runtime.cpu_share import CpuShare

    class Call:
        polls = 0

        def poll(self) -> bool:
            Call.polls += 1
            assert Call.polls < 10, "the pool kept resuming the guest"
            inst.submitted = True  # submitted work, then its slice ended
            return False

    inst = SimpleNamespace(
        seq=1, alive=True, call=Call(), blocked=None, submitted=False, cohort=None,
        started=True, kill_reason=None, cpu_s=0.0, ran_at=0.0, queued=True,
        store=SimpleNamespace(fresh_slice=lambda ticks: None),
    )  # fmt: skip
    woken: list[Any] = []
    guests = SimpleNamespace(
        rt=SimpleNamespace(stats=SimpleNamespace(poll_s=0.0, guest_polls=0)),
        config=RuntimeConfig(), cpu_share=CpuShare(0.25), runq=deque([inst]),
        mid_submission=set(), guest_turn_s=0.0, started_now=None,
        ready=lambda i: True, begin_turn=lambda i: None, make_runnable=woken.append,
    )  # fmt: skip
    pool = TurnPool(2)
    try:
        turns: list[Any] = []
        pool.run(guests, 1, lambda: turns.append(1))  # type: ignore[arg-type]
    finally:
        pool.close()
    assert Call.polls == 2 and turns == [1]
    assert 1 in guests.mid_submission and woken == [inst, inst]  # runnable for the next pass
