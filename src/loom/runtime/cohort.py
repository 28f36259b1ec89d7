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
