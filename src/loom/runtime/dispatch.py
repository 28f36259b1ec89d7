"""Dispatch: when forward work goes to the engine, and what comes back.

The dispatcher keeps the batches in flight (``Flight``), decides with the batch policy
(``Batcher.decide``) when the forward work at the queues' heads fires, assembles it
(``assembly``), sends it to the engine worker, and hands the results out
(``fanout``). One batch runs at a time, except the passes ahead of decode loops
(``step-chain``), which go as the next batch while the one they follow runs. It also
counts what a GPU would feel: passes, and the engine's idle time while work was ready.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from loom.engine.worker import ChunkStep, EngineWorker, ExecuteOp, GenPlan, NudgeOp
from loom.runtime.assembly import assemble, plan_generations
from loom.runtime.batcher import Batcher
from loom.runtime.commands import CommandQueue, ForwardCmd, GenerateCmd
from loom.runtime.eager import EagerCommands
from loom.runtime.fanout import ResultFanout
from loom.runtime.flight import Flight
from loom.runtime.guests import Guests
from loom.runtime.sampling_states import SamplingStates
from loom.runtime.services import RuntimeServices, RuntimeStats


class Dispatcher:
    """Forward batches between the queues and the engine worker (runtime thread only)."""

    def __init__(
        self,
        rt: RuntimeServices,
        worker: EngineWorker,
        batcher: Batcher,
        guests: Guests,
        eager: EagerCommands,
        inbox: deque[Any],
        wake: threading.Event,
    ) -> None:
        self.rt = rt
        self.config = rt.config
        self.worker = worker
        self.batcher = batcher
        self.guests = guests
        self.eager = eager
        self._inbox = inbox
        self._wake = wake
        self.flights: dict[int, Flight | None] = {}  # op id -> batch (None: a page op)
        self._op_callbacks: dict[int, Callable[[Any], None]] = {}  # op id -> its reader
        self.batch_inflight = False
        self.last_flight: Flight | None = None  # the batch sent last, while in flight
        self._chunk_flight: Flight | None = None  # the batch in flight, if it has plans
        self._forward_enqueued = 0  # forward-kind commands ever queued (nudge decisions)
        self._largest_since_fire = 0  # most tokens of a forward queued since a batch fired
        self._engine_step_s = 0.0  # moving average of an engine step (adaptive policy)
        self.idle_since: float | None = None  # the engine went free with work ready
        # Set when commands were queued (host functions run on this thread, so a flag the
        # loop reads before it sleeps is enough, and costs nothing next to an Event).
        self.poked = False
        self.states = SamplingStates(self.submit_op)
        self.fanout = ResultFanout(rt, guests, self.states, self.nudge)

    @property
    def stats(self) -> RuntimeStats:
        return self.rt.stats  # (read each time: benchmarks swap in fresh counters)

    # ===== ops and commands =====

    def submit_op(self, op: Any, callback: Callable[[Any], None]) -> None:
        """Send ``op`` to the engine worker; ``callback(result)`` runs on this thread when
        it is done (the result may be an exception)."""
        self._op_callbacks[self.worker.submit(op)] = callback

    def track_op(self, op: Any) -> None:
        """Submit an engine op whose result nobody waits for (errors still surface)."""
        self.flights[self.worker.submit(op)] = None

    def poke(self) -> None:
        self.poked = True

    def enqueue(self, q: CommandQueue, cmd: Any) -> None:
        """Queue ``cmd`` (from a host call, or a host-driven completion)."""
        if isinstance(cmd, GenerateCmd) and cmd.task.needs_state:
            self.states.start(cmd.task)
        if isinstance(cmd, (ForwardCmd, GenerateCmd)):
            self._forward_enqueued += 1
            n = cmd.num_tokens
            if n > self._largest_since_fire:
                self._largest_since_fire = n
            cmd.submitted_at = time.perf_counter()
            src = getattr(cmd, "ahead_of", None)
            if src is not None and src.flight is not None:
                src.flight.followers_queued += 1
            owner = self.guests.by_seq.get(q.owner)
            if owner is not None:
                owner.submitted = True
        q.push(cmd)
        self.poked = True

    def advance_queues(self) -> None:
        """Run the eager commands queued so far. Forward work is looked at right after
        (fired, left to a batch in flight, or held by the policy with a timeout), so the
        loop needs no turn more for it before it sleeps (``fire`` asks for one when
        commands wait behind the passes it took)."""
        self.poked = False
        self.eager.advance()

    # ===== firing =====

    def maybe_fire(self, before_guests: bool = False) -> float | None:
        """Fire the ready forward work if the policy says so; else seconds it may wait."""
        if self.batch_inflight:  # one batch at a time: nothing to decide until it returns
            self._maybe_nudge()
            return None
        guests = self.guests
        if guests.mid_submission:  # set by the guest pass; cleared once the next is due
            if before_guests:
                guests.mid_submission.clear()
            return None
        heads = self.batcher.ready_heads()
        if not heads:  # (what ``decide`` answers then, without asking it)
            return None
        decision = self.batcher.decide(
            self.batch_inflight,
            heads,
            time.perf_counter(),
            guests_idle=not guests.runq,
            runnable_before_guests=len(guests.runq) if before_guests else 0,
            guest_turn_s=guests.guest_turn_s,
            engine_step_s=self._engine_step_s,
        )
        if not decision.fire:
            return decision.wait_s
        self.fire(heads)
        return None

    def maybe_fire_ahead(self, mid_pass: bool = False) -> None:
        """While a batch runs, send the passes ahead that follow it (``step-chain``) as
        the next batch: the worker fills in their tokens from the running batch's results
        and starts them at once, without the round trip through this thread (~2 ms a step
        measured on the ~40M model). Other ready forward passes ride along (they run after
        the batch in flight, as any later op; if it fails, this batch fails with it), and
        so do host generations whose step is not the one in flight (left out, an API
        request would wait for a decode loop's last step). Once every guest sleeps, or
        ``mid_pass``: once every decode loop of the running batch queued its next step,
        while other guests (instances starting) are still to run."""
        if self.config.batch_policy != "adaptive":
            return
        if not mid_pass and (self.guests.mid_submission or self.guests.runq):
            return
        last = self.last_flight
        if last is None or last.plans or last.kv_sends:
            return
        # (``flights`` also holds page ops, as None: rarely, so count only then.)
        if len(self.flights) != 1 and sum(f is not None for f in self.flights.values()) != 1:
            return  # one batch queued behind the running one is enough
        self.advance_queues()  # page allocations queued before the passes ahead
        heads: list[CommandQueue] = []
        ahead = 0
        running = {id(part[2]) for part in last.parts}
        for q in self.batcher.queues:
            cmd = q.peek()
            if q.held:
                continue
            if isinstance(cmd, GenerateCmd):
                if id(cmd) not in running:  # (its inputs are known: its pending tokens)
                    heads.append(q)
                continue
            if not isinstance(cmd, ForwardCmd):
                continue
            if cmd.ready():
                heads.append(q)
            elif cmd.ahead_of is not None and cmd.ahead_of.flight is last:
                heads.append(q)
                ahead += 1
        if ahead:
            heads.sort(key=lambda q: -q.priority)
            self.fire(heads, after=last)

    def fire(self, heads: list[CommandQueue], after: Flight | None = None) -> None:
        """Submit one batch of the forward work at ``heads``. ``after``: the batch in
        flight that passes ahead among the heads follow (their tokens come from it)."""
        built = assemble(self.rt, self.guests, self.eager, heads, after, self.poke)
        if built is None:
            return
        flight = built.flight
        plans: list[GenPlan] = []
        if (
            built.only_generations
            and after is None
            and built.all_heads_taken
            and not self.guests.runq
            and not self._inbox
        ):
            plans = plan_generations(self.rt, flight)
        op = ExecuteOp(built.batch, self.rt.pool.drain_fresh(), plans, built.kv_sends, built.chain)
        op_id = self.worker.submit(op)
        stats = self.stats
        if self.idle_since is not None:
            stats.engine_idle_s += time.perf_counter() - self.idle_since
            stats.idle_gaps += 1
            self.idle_since = None
        self._largest_since_fire = 0
        self._chunk_flight = flight if plans else None
        flight.forward_enqueued = self._forward_enqueued
        self.flights[op_id] = flight
        self.last_flight = flight
        self.batch_inflight = True
        n = len(flight.parts)
        stats.batches += 1
        stats.forward_cmds += n
        stats.batch_sizes.append(n)
        stats.batch_size_hist.observe(n)
        stats.batch_tokens += len(built.batch.token_ids)
        if after is not None:
            stats.chained_batches += 1

    def _maybe_nudge(self) -> None:
        """While the worker runs a generation chunk, new forward work would wait for the
        whole chunk: tell the worker (once per batch) to hand back what it has."""
        flight = self._chunk_flight
        # A chunk is planned only when every forward head rode the batch and no guest was
        # runnable, so forward work enqueued since then (or a runnable guest) is new.
        if flight is not None and (
            self.guests.runq or self._forward_enqueued > flight.forward_enqueued
        ):
            self.nudge(flight)

    def nudge(self, flight: Flight) -> None:
        """Ask the worker to cut ``flight``'s generation chunk short (once)."""
        if not flight.nudged:
            flight.nudged = True
            self.stats.nudges += 1
            self.submit_op(NudgeOp(), lambda _: None)

    def after_turns(self) -> Callable[[], None]:
        """What to do after each guest's turn of one pass over the run queue."""
        tried_fire = False
        guests = self.guests

        def after_turn() -> None:
            nonlocal tried_fire
            last = self.last_flight
            if (
                last is not None
                and not last.ahead_tried
                and 0 < last.chained_parts <= last.followers_queued
                and self.batch_inflight
            ):
                last.ahead_tried = True  # every decode loop in it queued its next step
                self.maybe_fire_ahead(mid_pass=True)
            # A prefill arrived that outweighs what the rest of the pass is likely to add
            # (a decode token each), or work waits that no guest of this pass adds to
            # (host generations, passes ahead): if the engine is free, fire now rather
            # than after every guest ran. Decode steps of guests that wait on each pass
            # never fire mid-pass, else the woken guests would split into cohorts again.
            # A long pass (many instances starting, ~3-6 ms each) looks for the engine's
            # result after each guest, so the engine goes on working batch after batch
            # instead of idling until the pass ends. One attempt per time the engine is
            # found free: it scans every queue.
            prefill_waits = self._largest_since_fire > len(guests.runq)
            if self.batch_inflight and (prefill_waits or self._wake.is_set()):
                self.drain_engine()
                if not self.batch_inflight:
                    tried_fire = False
            if (
                not tried_fire
                and not self.batch_inflight
                and not guests.mid_submission  # not before those guests are done
                and (prefill_waits or self.batcher.guestless_work_ready())
            ):
                tried_fire = True
                self.advance_queues()
                self.maybe_fire(before_guests=True)

        return after_turn

    def reset(self) -> None:
        """Forget every batch and op in flight (their worker is gone)."""
        self.flights.clear()
        self._op_callbacks.clear()
        self.batch_inflight = False
        self.last_flight = self._chunk_flight = None
        self.idle_since = None
        self._largest_since_fire = 0

    # ===== results =====

    def drain_engine(self) -> None:
        """Take every result the worker has: op callbacks, chunk steps, batches."""
        for op_id, result in self.worker.drain():
            if isinstance(result, ChunkStep):
                progressing = self.flights.get(op_id)
                if progressing is not None:
                    self.fanout.on_chunk_step(progressing, result)
                continue
            callback = self._op_callbacks.pop(op_id, None)
            if callback is not None:
                callback(result)
                continue
            flight = self.flights.pop(op_id, None)
            if flight is None:  # a page op (copy/mask): its ids were checked when queued
                continue
            now = time.perf_counter()
            followers = [f for f in self.flights.values() if f is not None] if self.flights else []
            self.batch_inflight = bool(followers)
            if self._chunk_flight is flight:
                self._chunk_flight = None
            if self.last_flight is flight:
                self.last_flight = None
            for follower in followers:
                follower.submitted_at = now  # the engine starts on it now
            step_s = now - flight.submitted_at
            self.stats.step_latency.observe(step_s)
            if not flight.plans:  # one step (a generation chunk is many)
                self._engine_step_s += 0.2 * (step_s - self._engine_step_s)
            self.fanout.complete(flight, result)
            if not self.batch_inflight and self._work_pending():
                # From when the result arrived: the runtime may have been running guests.
                self.idle_since = min(now, self.worker.last_arrival or now)

    def _work_pending(self) -> bool:
        """Whether a guest may run or a command waits: the engine is idle for the runtime."""
        guests = self.guests
        return bool(guests.runq or guests.mid_submission) or self.batcher.any_queued()
