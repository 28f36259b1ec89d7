"""``CpuShare``: how guests that spin share the runtime thread with the others.

A guest whose last turn ran to the end of its time slice is CPU-bound. While there is
one, the epoch ticks ``SLICE_TICKS`` times a slice and a CPU-bound guest's turn lasts
one tick, after every other runnable guest's turn; and while other instances live,
CPU-bound guests together get at most ``share`` of the thread's time (a credit that
refills at that rate), the rest of their turns held back until the credit is there. A
spinning inferlet then delays another's next step by a tick, not by a slice, and leaves
the cores to the engine and the server most of the time.
"""

from __future__ import annotations

import time

from loom.runtime.instance import Instance

SLICE_TICKS = 10  # epoch ticks a slice while some guest is CPU-bound
_MAX_CREDIT_S = 0.02  # (a burst: two slices)


class CpuShare:
    def __init__(self, share: float) -> None:
        self.share = share
        self.bound: set[int] = set()  # seqs of CPU-bound guests
        self.held: list[Instance] = []  # their turns held back (still marked queued)
        self._credit = _MAX_CREDIT_S
        self._at = time.perf_counter()

    def _refill(self) -> float:
        now = time.perf_counter()
        self._credit = min(_MAX_CREDIT_S, self._credit + (now - self._at) * self.share)
        self._at = now
        return self._credit

    def order(self, turn: list[Instance], contended: bool) -> list[Instance]:
        """This loop turn's guests, CPU-bound ones last; those the credit does not cover
        (when others live: ``contended``) are held back instead."""
        bound = self.bound
        turn.sort(key=lambda i: i.seq in bound)  # (stable: FIFO otherwise)
        if not contended or self._refill() > 0:
            return turn
        keep = [i for i in turn if i.seq not in bound]
        self.held += [i for i in turn if i.seq in bound]
        return keep

    def readmit(self, contended: bool) -> list[Instance]:
        """Held turns that may run now (credit back, or nobody else to wait for)."""
        if not self.held or (contended and self._refill() <= 0):
            return []
        held, self.held = self.held, []
        return held

    def wait_s(self) -> float:
        """How long the runtime may sleep before held turns can run (1: none held)."""
        if not self.held:
            return 1.0
        return max(0.0, -self._refill() / self.share) + 0.001

    def ticks(self, inst: Instance) -> int:
        """The epoch ticks of ``inst``'s next turn (0: the store's own slice)."""
        if not self.bound:
            return 0
        return 1 if inst.seq in self.bound else SLICE_TICKS

    def ran(self, inst: Instance, dt: float, preempted: bool, slice_s: float) -> None:
        """A turn of ``dt`` s ended: its slice ran out (``preempted``) or not. A slice
        ends at the next tick, anywhere in the first one: only a guest that ran most of
        a whole slice (``slice_s``) is taken for CPU-bound, not one a tick caught early."""
        bound = self.bound
        if not preempted:
            bound.discard(inst.seq)
        elif inst.seq in bound:
            self._refill()
            self._credit -= dt
        elif dt >= 0.8 * slice_s:
            bound.add(inst.seq)

    def forget(self, inst: Instance) -> None:
        self.bound.discard(inst.seq)
