"""The limits on all instances together, checked by the runtime loop ten times a second:
the memory budget (``memory_budget.py``), and once a second the idle limit; and the sizes
of the instance pool, which follow from the per-instance limits."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from loom.config import RuntimeConfig
from loom.runtime.instance import Instance
from loom.runtime.wasm.engine import InstancePool

if TYPE_CHECKING:
    from loom.runtime.guests import Guests


def instance_pool(config: RuntimeConfig) -> InstancePool | None:
    """The pool's slots: one per instance allowed to run, plus the ended ones whose stores
    wait to be freed (``StoresToFree`` holds at most 65); each memory slot as large as
    the per-instance memory cap. None when the pool is off."""
    if not config.instance_pool:
        return None
    return InstancePool(
        instances=config.max_instances + 80,
        memory_bytes=config.memory_limit_bytes,
        keep_resident_bytes=config.pool_resident_mb << 20,
    )


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
