"""One memory budget for all instances together (``--memory-budget-mb``).

The per-instance cap (``--memory-limit-mb``) bounds each guest, not how many of them grow
at once. wasmtime does not report a component's linear memory, so the budget is kept on
what the process holds: its resident memory above what it held once started. Checked ten
times a second; once over half the budget, every guest turn is measured (two reads of
``/proc/self/statm``, ~1 µs) so that the growth is put down to the instances that made it.
Over the budget, the instance that grew it most is ended, one per check; the process can
pass the budget by at most what guests allocate in a tenth of a second (and never by more
than one instance's cap per instance).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from loom.config import RuntimeConfig
from loom.runtime.instance import Instance

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _open_statm() -> int | None:
    try:
        return os.open("/proc/self/statm", os.O_RDONLY)
    except OSError:  # not Linux: no budget (the per-instance caps still hold)
        return None


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


class MemoryBudget:
    """Resident memory of the process above its start, held to the configured budget."""

    def __init__(self) -> None:
        self._statm = _open_statm()
        self.baseline = 0  # taken at the first check: the runtime's loop is up, weights in
        self._auto_budget = _available_bytes() // 2
        self.watching = False  # over half the budget: turns are measured
        self.grown: dict[int, int] = {}  # instance seq -> bytes its turns added, watched

    def budget(self, config: RuntimeConfig) -> int:
        mb = config.memory_budget_mb
        return mb << 20 if mb else self._auto_budget

    def rss(self) -> int:
        if self._statm is None:
            return 0
        return int(os.pread(self._statm, 64, 0).split()[1]) * _PAGE

    def used(self) -> int:
        """Bytes the process holds beyond what it held at start."""
        return self.rss() - self.baseline

    def turn_grew(self, inst: Instance, before: int) -> None:
        """``inst``'s turn, begun at resident size ``before``, is over: count its growth."""
        self.grown[inst.seq] = self.grown.get(inst.seq, 0) + self.rss() - before

    def forget(self, inst: Instance) -> None:
        self.grown.pop(inst.seq, None)

    def over_budget(
        self, instances: Iterable[Instance], config: RuntimeConfig
    ) -> tuple[Instance, str] | None:
        """The instance to end and why, when the process is over its budget."""
        if self._statm is None:
            return None
        if not self.baseline:
            self.baseline = self.rss()
        used, budget = self.used(), self.budget(config)
        self.watching = used > budget // 2
        if not self.watching:
            self.grown.clear()
            return None
        if used <= budget:
            return None
        grown = self.grown
        alive = [i for i in instances if i.alive and grown.get(i.seq, 0) > 0]
        if not alive:  # nothing measured grew it (yet): nobody to blame
            return None
        worst = max(alive, key=lambda i: grown[i.seq])
        mib = max(1, grown.pop(worst.seq) >> 20)
        return worst, (f"the server's memory budget ({budget >> 20} MiB for all instances) "
                       f"is used up, and this instance grew it the most (+{mib} MiB)")  # fmt: skip
