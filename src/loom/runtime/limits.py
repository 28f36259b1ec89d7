"""The limits on all instances together, checked by the runtime loop ten times a second:
the memory budget (``memory_budget.py``), and once a second the idle limit."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from loom.runtime.instance import Instance

if TYPE_CHECKING:
    from loom.runtime.guests import Guests


class InstanceLimits:
    def __init__(self, guests: Guests) -> None:
        self.guests = guests
        self._next_idle_check = 0.0

    def check(self, now: float) -> None:
        guests = self.guests
        over = guests.memory.over_budget(guests.instances.values(), guests.config)
        if over is not None:
            guests.kill(*over)
        if now >= self._next_idle_check:
            self._next_idle_check = now + 1.0
            self.end_idle()

    def end_idle(self) -> None:
        """End instances that waited longer than ``idle_timeout_s`` on anything but their
        own engine work (queued or running commands, a host generation, are work)."""
        guests = self.guests
        limit = guests.config.idle_timeout_s
        if not limit:
            return
        before = time.perf_counter() - limit
        for inst in list(guests.instances.values()):
            if _idle_since(inst, before):
                guests.kill(inst, f"idle for more than {limit:g} s")


def _idle_since(inst: Instance, before: float) -> bool:
    """A guest (not a host-driven job) that last ran before ``before`` and has no engine
    work queued or running."""
    if inst.job is not None or inst.call is None or inst.queued or not inst.ran_at:
        return False
    return inst.ran_at < before and not any(q.inflight or q.head < len(q.cmds)
                                            for q in inst.queues)  # fmt: skip
