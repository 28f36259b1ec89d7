"""How many torch threads the engine runs with, given what other processes take.

A forward pass on the CPU is hundreds of parallel regions, each ending in a barrier that
waits for its slowest thread. When another process is busy on one of our cores, the
thread that shares that core runs only when the OS scheduler gives it a turn, and every
barrier waits for that turn: on a 2-core machine with one core busy, a decode step of the
41.6M model went from ~8 to ~70 ms (batch 1), 14-30x the cost of the lost core. With one
thread fewer the engine loses about that core's share instead.

``ThreadGovernor`` reads, every ``interval_s``, the busy time of the cores this process
may run on (``/proc/stat``) minus this process's own CPU time: the rest is other
processes (and the hypervisor's steal). Each core's worth of that time, rounded from 0.35
up, takes one thread away; when it is gone the threads come back. A window that spans an
idle engine is not used: the load of a burst that ended meanwhile would cost the next
pass a thread for nothing. Waiting policies do not fix this: passive waiting
(``OMP_WAIT_POLICY=PASSIVE``) holds up under load but costs 35-45% on an idle machine,
since every barrier then sleeps and wakes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

# Other processes' load, in cores, from which one thread is given up (0.35: a competitor
# sharing one core with an engine thread gets about half of it).
_GIVE_UP_AT = 0.35


def _busy_ticks(cores: set[int]) -> tuple[int, int] | None:
    """(busy, total) clock ticks of ``cores`` since boot; None where /proc/stat is absent."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    busy = total = 0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cores:
            continue
        ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
        total += sum(ticks)
        busy += sum(ticks) - ticks[3] - ticks[4]
    return busy, total


class ThreadGovernor:
    """Sets ``torch.set_num_threads`` from the load other processes put on our cores."""

    def __init__(self, max_threads: int | None = None, interval_s: float = 0.25) -> None:
        self.cores = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set()
        self.max_threads = max_threads or torch.get_num_threads()
        self.interval_s = interval_s
        self.threads = self.max_threads
        self.others = 0.0  # other processes' load at the last reading, in cores
        self._wanted = self.max_threads  # the count the last window asked for
        self._tick_s = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01
        self._last = self._read()
        self._next = time.monotonic() + interval_s

    def _read(self) -> tuple[int, int, float] | None:
        ticks = _busy_ticks(self.cores) if len(self.cores) > 1 else None
        return None if ticks is None else (*ticks, time.process_time())

    def poll(self) -> int:
        """Before a pass: re-read the load once ``interval_s`` has passed; the threads."""
        now = time.monotonic()
        if now < self._next or self._last is None:
            return self.threads
        stale = now > self._next + 3 * self.interval_s
        self._next = now + self.interval_s
        cur = self._read()
        if cur is None:
            return self.threads
        busy, total, own = cur
        prev_busy, prev_total, prev_own = self._last
        self._last = cur
        if stale:
            # The engine sat idle: what others did meanwhile (a burst that has ended) says
            # little about now. Keep the threads; the next window decides.
            return self.threads
        if total <= prev_total:
            return self.threads
        # Wall seconds of the window: ``total`` counts every core's ticks.
        window_s = (total - prev_total) * self._tick_s / len(self.cores)
        other_s = (busy - prev_busy) * self._tick_s - (own - prev_own)
        self.others = max(0.0, other_s / window_s)
        taken = int(self.others + (1 - _GIVE_UP_AT))
        want = max(1, self.max_threads - taken)
        # Two windows in a row must agree: a blip does not flip the count (every change
        # also moves float results by an ulp, since kernels split work by thread).
        if want != self.threads and want == self._wanted:
            self.threads = want
            torch.set_num_threads(want)
        self._wanted = want
        return self.threads
