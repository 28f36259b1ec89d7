"""A guest's turn: what follows it (``end_turn``), and turns side by side on a pool of
threads (``TurnPool``).

A turn is mostly guest code: of a launch cohort's first turns (instantiation, ``main`` up
to its first wait), 87 % of the time is inside the guest and 13 % in host calls (32
Python instances, 2-core Zen 4). wasmtime's poll releases the GIL while the guest runs,
so several guests can run at once; every host call takes ``HOST_LOCK`` for the time it
runs Python, so the runtime's state is still touched by one thread at a time. What a turn
leaves behind (ends, wakes, statistics, the cohort's progress) is taken up on the runtime
thread once the pool is done, in run-queue order, exactly as after a turn there.

Serial, a cohort of N Python instances starts in N × ~5 ms on the runtime thread before
its first pass: against 2-3 ms GPU decode steps, that start-up is the programmability
tax, and the pool is meant to divide it by its threads. Measured on the 2-core VM of the
tests, it does not yet: with 2 threads each instance's turns cost ~2.2× the CPU time
(32 instances of an empty inferlet: 55 ms serial, 63-85 ms on 2 threads), and `perf`
puts 36 % of that time in TLB-shootdown IPIs (``smp_call_function_many_cond``,
``native_write_msr``: a VM exit each), sent whenever memory of the process is unmapped
while another of its threads runs: stores freed and instantiated, fiber stacks. Hence
off by default (``guest_threads=1``); ``benchmarks/gpu.py`` measures it on the GPU host.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from time import perf_counter
from typing import Protocol

from loom.config import RuntimeConfig
from loom.engine.worker.cpu_placement import pin_current_thread
from loom.runtime.cpu_share import CpuShare
from loom.runtime.instance import Instance
from loom.runtime.services import RuntimeServices


class Guests(Protocol):
    """What a turn's end and the pool use of ``guests.Guests`` (which imports this)."""

    rt: RuntimeServices
    config: RuntimeConfig
    cpu_share: CpuShare
    runq: deque[Instance]
    mid_submission: set[int]
    guest_turn_s: float
    started_now: list[Instance] | None

    def ready(self, inst: Instance) -> bool: ...
    def begin_turn(self, inst: Instance) -> None: ...
    def first_turn_over(self, inst: Instance) -> None: ...
    def end(self, inst: Instance, ok: bool, error: str | None) -> None: ...
    def on_call_done(self, inst: Instance) -> None: ...
    def make_runnable(self, inst: Instance) -> None: ...


def end_turn(guests: Guests, inst: Instance, done: bool, dt: float) -> None:
    """What follows a turn of ``dt`` seconds that ``done`` the call or not."""
    inst.ran_at = perf_counter()
    inst.cpu_s += dt
    stats = guests.rt.stats
    stats.poll_s += dt
    stats.guest_polls += 1
    preempted = not done and inst.blocked is None
    guests.cpu_share.ran(inst, dt, preempted, guests.config.slice_ms / 1000.0)
    if done or inst.blocked is not None:
        guests.mid_submission.discard(inst.seq)
    if not done and inst.submitted:
        if inst.blocked is None:
            guests.mid_submission.add(inst.seq)  # preempted: let it finish first
        else:  # a whole turn: submitted a pass and waits for it (batching decisions)
            guests.guest_turn_s += 0.1 * (dt - guests.guest_turn_s)
    inst.submitted = False
    if inst.cohort is not None and inst.started and (done or inst.blocked is not None):
        guests.first_turn_over(inst)
    if inst.kill_reason is not None:
        guests.end(inst, False, inst.kill_reason)
    elif done:
        guests.on_call_done(inst)
    elif inst.cpu_s > guests.config.cpu_budget_s:
        guests.end(inst, False, f"CPU budget of {guests.config.cpu_budget_s:g} s exceeded")
    elif inst.blocked is None or inst.blocked.ready():
        guests.make_runnable(inst)  # its time slice ended (or it is ready already)


def default_threads(cores: int) -> int:
    """Guest threads for this many cores: half of them, at most 8 (the engine, the event
    loop and the runtime thread need the rest); 1 (no pool) below 4 cores."""
    return max(1, min(8, cores // 2)) if cores >= 4 else 1


def turn_pool(threads: int) -> TurnPool | None:
    """The pool of ``threads`` threads (0: ``default_threads`` of this process's cores);
    None for 1 (every turn on the runtime thread, the default)."""
    threads = threads or default_threads(len(_process_cores()))
    return TurnPool(threads) if threads > 1 else None


def _poll(inst: Instance) -> tuple[bool, float]:
    """Run ``inst``'s call (on a pool thread): whether it is done, and the seconds."""
    assert inst.call is not None
    t0 = perf_counter()
    done = inst.call.poll()
    return done, perf_counter() - t0


class TurnPool:
    """``threads`` threads, allowed on ``cores`` (None: wherever this process may run;
    the runtime thread's own pinning is not inherited)."""

    def __init__(self, threads: int, cores: frozenset[int] | None = None) -> None:
        if threads < 2:
            raise ValueError(f"a turn pool needs 2 threads or more, got {threads}")
        self.threads = threads
        self.rounds = 0  # rounds run side by side (tests and benchmarks read it)
        self._pool = ThreadPoolExecutor(threads, "loom-guest", _unpin, (cores,))

    def run(self, guests: Guests, n: int, after_turn: Callable[[], None]) -> None:
        """One turn for each of the first ``n`` of the run queue, taken off it a round
        of a few per thread at a time (the run queue shrinks as turns go, as batching
        decisions expect), the dispatcher looking at the engine after each round; at
        once a further turn for those whose work is half submitted or whose
        instantiation just completed."""
        runq, chunk = guests.runq, 4 * self.threads
        while n > 0:
            take = min(n, chunk)
            n -= take
            batch = [inst for inst in (runq.popleft() for _ in range(take)) if guests.ready(inst)]
            extra: set[int] = set()  # those given their one more slice (as serial turns do)
            while batch:
                batch = self._round(guests, batch, extra)
            after_turn()

    def _round(self, guests: Guests, batch: list[Instance], extra: set[int]) -> list[Instance]:
        """Turns of ``batch`` side by side; the instances that go on at once (once each
        for a half-submitted pass, ``extra``)."""
        again: list[Instance] = []
        guests.started_now = again
        try:
            for inst in batch:
                guests.begin_turn(inst)
            results = list(self._pool.map(_poll, batch)) if len(batch) > 1 else [_poll(batch[0])]
            self.rounds += 1
            for inst, (done, dt) in zip(batch, results, strict=True):
                if not inst.alive:
                    continue  # ended by what an earlier turn of this round left behind
                end_turn(guests, inst, done, dt)
                if (
                    inst.seq in guests.mid_submission
                    and inst.alive
                    and inst.blocked is None
                    and inst.seq not in extra
                ):
                    extra.add(inst.seq)
                    again.append(inst)  # its slice ended mid-submission: one more now
        finally:
            guests.started_now = None
        # (Each at most once: one just instantiated ended its turn done, so it is not
        # also mid-submission. One may have been ended since by a later turn's end.)
        return [inst for inst in again if inst.alive and inst.call is not None]

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _unpin(cores: frozenset[int] | None) -> None:
    """A pool thread's initializer: run on ``cores`` or every core of the process (a new
    thread inherits the affinity of the thread that made it, the pinned runtime thread)."""
    pin_current_thread(cores or _process_cores() or None)


def _process_cores() -> frozenset[int]:
    """The cores the process may use (those of its main thread)."""
    if not hasattr(os, "sched_getaffinity"):
        return frozenset()
    try:
        return frozenset(os.sched_getaffinity(os.getpid()))
    except OSError:
        return frozenset()
