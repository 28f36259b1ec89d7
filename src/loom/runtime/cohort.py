"""Launch cohorts: instances launched together start their work together.

``Runtime.launch_batch`` launches N instances as one cohort, the inferlet counterpart of
``LLM.generate`` over a list of prompts. Guests start one after another on the runtime
thread (a Python inferlet takes ~5-10 ms to instantiate and reach its first pass), so
without a hold the first members would decode alone while the rest start, and the cohort
would take as many extra engine passes as its start-up spread spans in steps: 32 starts
at ~7 ms over 10 ms steps measured ~22 passes more than the built-in scheduler's 64. A
cohort's forward work is therefore held out of engine batches until every member has
ended its first turn (waits on something, or ends); then it all rides the same pass.
Work of other instances is never held. A member that runs longer than the hold limit
without waiting (a guest computing before it submits) releases the cohort, so a slow
member cannot stall the others.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from loom.runtime.commands import CommandQueue


@dataclass(eq=False)
class Cohort:
    """Members still in their first turn, and the queues held until they all are done."""

    starting: set[int]  # seqs of members whose first turn has not ended
    last_progress: float  # perf_counter time a member last ended its first turn
    queues: list[CommandQueue] = field(default_factory=list)
    released: bool = False

    def hold(self, q: CommandQueue) -> None:
        """A member made a queue: its forward work waits for the cohort."""
        if not self.released:
            q.held = True
            self.queues.append(q)

    def first_turn_over(self, seq: int, now: float) -> bool:
        """Member ``seq`` waited or ended; True when that releases the cohort."""
        if seq in self.starting:
            self.starting.discard(seq)
            self.last_progress = now
        return not self.starting and not self.released

    def stalled(self, now: float, hold_s: float) -> bool:
        return not self.released and now - self.last_progress > hold_s

    def release(self) -> None:
        self.released = True
        for q in self.queues:
            q.held = False
        self.queues.clear()


class Cohorts:
    """The cohorts still starting. ``on_release`` runs when one is released (its held
    work is ready: the loop takes a turn more to fire it)."""

    def __init__(self, hold_ms: float, on_release: Callable[[], None]) -> None:
        self.hold_s = hold_ms / 1000.0
        self.starting: list[Cohort] = []
        self._on_release = on_release

    def start(self, members: set[int]) -> Cohort | None:
        """A cohort of the instances ``members`` (seqs); None when there are none."""
        if not members:
            return None
        cohort = Cohort(members, time.perf_counter())
        self.starting.append(cohort)
        return cohort

    def first_turn_over(self, cohort: Cohort, seq: int) -> None:
        if cohort.first_turn_over(seq, time.perf_counter()):
            self._release(cohort)

    def release_stalled(self) -> float:
        """Release cohorts none of whose members ended a first turn for the hold limit;
        seconds until the next one would be."""
        now = time.perf_counter()
        for cohort in list(self.starting):
            if cohort.stalled(now, self.hold_s):
                self._release(cohort)
        if not self.starting:
            return self.hold_s
        return max(0.0, min(c.last_progress for c in self.starting) + self.hold_s - now)

    def _release(self, cohort: Cohort) -> None:
        cohort.release()
        self.starting.remove(cohort)
        self._on_release()
