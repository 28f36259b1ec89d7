"""Which cores the runtime thread and a process engine worker run on.

The runtime thread runs every guest and every host call; the engine worker runs the
forward passes. Left to the scheduler, the runtime thread wakes after each engine step on
whichever core is free, often the one the engine just filled with its own data, and its
guests and host calls then run from cold caches. Kept on a core of its own (with the
worker's reader thread, whose results it takes next), its working set stays warm there:
on the 2-core test machine, host time per call fell by 11% at one instance and by 1-5%
at 10 and 100; at 1000, where the runtime thread is never idle, it came out between 6%
slower and 16% faster (ARCHITECTURE.md, Measured).

Pinning splits the cores this process may use (``os.sched_getaffinity``): the first one
for the runtime, the others for the engine. With fewer than two there is nothing to split
and nothing is pinned; to place several servers on one machine, start each on its own
cores (``taskset``), or turn pinning off.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class CpuPlacement:
    """``runtime``: the core of the runtime thread and the worker's reader thread;
    ``engine``: the engine worker's cores. None: left to the scheduler."""

    runtime: int | None = None
    engine: frozenset[int] | None = None

    @property
    def runtime_cores(self) -> frozenset[int] | None:
        """``runtime`` as the core set ``pin_current_thread`` takes."""
        return None if self.runtime is None else frozenset((self.runtime,))

    def describe(self) -> str:
        if self.runtime is None or self.engine is None:
            return "cores not pinned"
        cores = "core" if len(self.engine) == 1 else "cores"
        return f"runtime on core {self.runtime}, engine on {cores} {_ranges(self.engine)}"


UNPINNED = CpuPlacement()


def allowed_cpus() -> set[int]:
    """The cores this process may run on (empty where the OS does not say)."""
    if not hasattr(os, "sched_getaffinity"):
        return set()
    return set(os.sched_getaffinity(0))


def plan(allowed: Iterable[int]) -> CpuPlacement:
    """The placement for these cores: the first for the runtime, the rest for the engine;
    unpinned when there are fewer than two."""
    cores = sorted(set(allowed))
    if len(cores) < 2:
        return UNPINNED
    return CpuPlacement(cores[0], frozenset(cores[1:]))


def pin_current_thread(cores: Iterable[int] | None) -> None:
    """Keep the calling thread (and the threads it starts later) on ``cores``; None or an
    OS without affinity: nothing. A core taken away meanwhile (a changed cpuset) leaves the
    thread where it was: placement is a speed matter, never a reason to fail."""
    if cores is None or not hasattr(os, "sched_setaffinity"):
        return
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, set(cores))


def _ranges(cores: Iterable[int]) -> str:
    """``{1, 2, 3, 5}`` -> ``"1-3,5"``."""
    runs: list[list[int]] = []  # [first, last] of each run of consecutive cores
    for c in sorted(cores):
        if runs and runs[-1][1] == c - 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
