"""The guests: instances, their start, their turns on the runtime thread, and their end.

Every instance runs on a wasmtime fiber. A turn (``resume``) runs it until it waits on a
future (suspended inside ``types.poll``, costing nothing until woken), finishes, or its
time slice (an epoch tick) ends. ``run_guests`` gives each runnable instance one turn
and, after each, lets the dispatcher look at the engine (``after_turn``). An instance's
end releases everything it holds: pages, exports, handles, queues, subscriptions.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from loom.runtime import completions
from loom.runtime.batcher import Batcher
from loom.runtime.cohort import Cohorts
from loom.runtime.cpu_share import CpuShare
from loom.runtime.instance import EventListener, Instance, InstanceHandle, InstanceResult
from loom.runtime.memory_budget import MemoryBudget
from loom.runtime.messaging import Messaging
from loom.runtime.resources import InstancePages, InstanceTree
from loom.runtime.services import RuntimeServices
from loom.runtime.trees import refuse_child, too_many
from loom.runtime.turns import TurnPool, end_turn, turn_pool
from loom.runtime.wasm import ffi as wasm_ffi
from loom.runtime.wasm.engine import trap_summary
from loom.runtime.wasm.ffi import (
    Err,
    HostCallError,
    Ok,
    StoresToFree,
)

ChildListener = Callable[[InstanceHandle, str, list[str], str, bool], EventListener | None]


class Guests:
    """The live instances and the run queue of those ready for a turn."""

    def __init__(
        self,
        rt: RuntimeServices,
        batcher: Batcher,
        messaging: Messaging,
        on_cohort_release: Callable[[], None],
        post: Callable[[Any], None],
    ) -> None:
        self.rt = rt
        self._post = post
        self.config = rt.config
        self.batcher = batcher
        self.messaging = messaging
        self.instances: dict[str, Instance] = {}
        self.by_ctx: dict[int, Instance] = {}  # by store key: the caller of a host call
        self.by_seq: dict[int, Instance] = {}  # by launch order: the owner of a queue
        self.runq: deque[Instance] = deque()
        # Guests whose slice ended in the middle of submitting forward work (sibling forks;
        # an instance starting): one more slice each before the batch fires, so its passes
        # ride together. Left when it next waits or ends (one loop turn at most).
        self.mid_submission: set[int] = set()
        self.cpu_share = CpuShare(self.config.cpu_bound_share)
        # Moving average of a guest's turn that ends waiting on a pass it submitted (the
        # adaptive batch policy weighs it against an engine step).
        self.guest_turn_s = 0.0
        self.cohorts = Cohorts(self.config.cohort_hold_ms, on_cohort_release)
        self._pending_end: list[Instance] = []
        self.to_close = StoresToFree()  # ended instances' (freed while the loop idles)
        self.memory = MemoryBudget()
        self._seq = itertools.count()
        self.live_guests = 0  # instances that run code (completions are not counted)
        # Called for each child an instance launches (``handle, program, args, parent id,
        # detached``): the listener of its events, if any (the server's, so children are
        # listed and reachable as client-launched ones are).
        self.child_listener: ChildListener | None = None
        # Threads that run guests' turns side by side (None: all on the runtime thread),
        # and while they do, the instances whose instantiation a turn completed.
        self.turn_pool: TurnPool | None = turn_pool(self.config.guest_threads)
        self.started_now: list[Instance] | None = None

    # ===== start =====

    def next_seq(self) -> int:
        return next(self._seq)

    def register(self, inst: Instance) -> None:
        self.instances[inst.id] = inst
        self.by_ctx[inst.store.key] = inst
        self.by_seq[inst.seq] = inst

    def spawn_cohort(
        self, handles: list[InstanceHandle], program: str, args: list[list[str]]
    ) -> None:
        """Start one instance per argument list; their forward work waits for them all."""
        members = [self.spawn(h, program, a) for h, a in zip(handles, args, strict=True)]
        started = [inst for inst in members if inst is not None and inst.alive]
        cohort = self.cohorts.start({inst.seq for inst in started})
        for inst in started:
            inst.cohort = cohort

    def spawn(
        self,
        handle: InstanceHandle,
        program: str,
        args: list[str],
        parent: Instance | None = None,
        tree: InstanceTree | None = None,
    ) -> Instance | None:
        """Make an instance of ``program`` and put it on the run queue (a Python inferlet
        instantiates in its first turn; a native one at once). ``parent``: the instance it
        belongs to (it ends with it); ``tree``: the launcher's tree (None: a new one)."""
        if self.live_guests >= self.config.max_instances:
            cap = self.config.max_instances
            handle._finish(InstanceResult(handle.id, False, too_many(cap), 0.0, 0))
            return None
        rt = self.rt
        side, store = rt.engines.new_store(program, self.config.memory_limit_bytes, self.to_close)
        tree = tree if tree is not None else InstanceTree()
        inst = Instance(seq=self.next_seq(), id=handle.id, program=program, arguments=args,
                        store=store, pages=InstancePages(rt.pool, tree), handle=handle,
                        spawned_at=time.perf_counter(), parent=parent, tree=tree,
                        side=side)  # fmt: skip
        if parent is not None:
            parent.children.append(inst)
        self.register(inst)
        self.live_guests += 1
        tree.live += 1
        if side.programs.is_core(program):
            # A native inferlet instantiates at once (no start code runs); `run` next.
            try:
                core = side.core_linker.instantiate(store, side.programs.get_core(program))
                inst.call = side.core_linker.call_async(store, core, "run")
            except wasm_ffi.WasmError as e:
                self.end(inst, False, f"cannot start the native inferlet: {e}")
                return inst
            self._started(inst)
        else:
            inst.call = wasm_ffi.instantiate_async(side.linker, store, side.programs.get(program))
        rt.stats.spawned += 1
        self.make_runnable(inst)
        return inst

    def launch_child(
        self, parent: Instance, program: str, args: list[str], detached: bool = False
    ) -> InstanceHandle | str:
        """A host call of ``parent``: start a child instance at once; it ends with
        ``parent`` unless ``detached``. The error, when it cannot start."""
        refused = refuse_child(self.config, self.live_guests, parent.tree)
        if refused:
            return refused
        handle = InstanceHandle(uuid.uuid4().hex[:12], self._post)
        if self.child_listener is not None:
            handle.listener = self.child_listener(handle, program, list(args), parent.id, detached)
        inst = self.spawn(handle, program, list(args), None if detached else parent, parent.tree)
        assert inst is not None  # (refuse_child held it to the cap)
        ends = parent.child_ends
        if len(ends) >= 4096:  # a long-lived launcher: forget children that ended long ago
            for child_id in [c for c, end in ends.items() if end.done][:2048]:
                del ends[child_id]
        ends[inst.id] = inst.ended
        return handle

    def _started(self, inst: Instance) -> None:
        inst.started = True
        inst.spawn_s = time.perf_counter() - inst.spawned_at
        self.rt.stats.spawn_s.append(inst.spawn_s)

    # ===== turns =====

    def make_runnable(self, inst: Instance) -> None:
        if inst.alive and not inst.queued:
            inst.queued = True
            self.runq.append(inst)

    def waker(self, inst: Instance) -> Callable[[], None]:
        """A callable putting ``inst`` on the run queue (one per instance: every wait of
        every forward pass needs one)."""
        wake = inst.wake
        if wake is None:
            wake = inst.wake = lambda: self.make_runnable(inst)
        return wake

    def run_guests(self, after_turn: Callable[[], None]) -> bool:
        """One turn for each instance runnable now; False when there was none."""
        runq, share = self.runq, self.cpu_share
        if share.held:
            runq.extend(share.readmit(len(self.instances) > len(share.bound)))
        n = len(runq)
        if not n:
            return False
        if share.bound:  # (in place: the run queue shrinks as turns go, batching sees it)
            turn = share.order([runq.popleft() for _ in range(n)],
                               len(self.instances) > len(share.bound))  # fmt: skip
            runq.extendleft(reversed(turn))
            n = len(turn)
        elif self.turn_pool is not None and n > 1 and not self.memory.watching:
            # Side by side on the pool's threads (CPU-bound guests keep their share of the
            # runtime thread, and turns whose memory growth is measured run one by one).
            self.turn_pool.run(self, n, after_turn)
            return True
        for _ in range(n):
            inst = runq.popleft()
            if not self.ready(inst):
                continue
            self.resume(inst)
            if inst.seq in self.mid_submission and inst.alive and inst.blocked is None:
                # Its slice ended in the middle of submitting (an instance starting, or
                # sibling forks): one more slice now, so its work is whole before a batch
                # fires, instead of holding every batch until the pass comes back to it.
                self.resume(inst)
            after_turn()
        return True

    @staticmethod
    def ready(inst: Instance) -> bool:
        """Take ``inst`` off the run queue: whether it gets a turn."""
        inst.queued = False
        if not inst.alive or inst.call is None:
            return False
        # (a spurious wake: still waiting)
        return inst.blocked is None or inst.blocked.ready()

    def resume(self, inst: Instance) -> None:
        """Run ``inst`` until it waits, finishes or its time slice ends."""
        assert inst.call is not None
        self.begin_turn(inst)
        memory = self.memory
        rss = memory.rss() if memory.watching else 0
        t0 = time.perf_counter()
        done = inst.call.poll()
        dt = time.perf_counter() - t0
        if rss:
            memory.turn_grew(inst, rss)
        end_turn(self, inst, done, dt)

    def begin_turn(self, inst: Instance) -> None:
        inst.blocked = None
        inst.store.fresh_slice(self.cpu_share.ticks(inst))

    def first_turn_over(self, inst: Instance) -> None:
        cohort = inst.cohort
        inst.cohort = None
        self.cohorts.first_turn_over(cohort, inst.seq)

    def on_call_done(self, inst: Instance) -> None:
        assert inst.call is not None
        if inst.started or inst.call.error() is not None:
            failure = call_failure(inst)
            self.end(inst, failure is None, failure)
            return
        self._started(inst)
        try:
            inst.call = wasm_ffi.call_export_async(
                inst.store, inst.side.programs.get(inst.program), "run"
            )
        except wasm_ffi.WasmError as e:
            self.end(inst, False, str(e))
            return
        # Straight on into ``main``: its first forward can reach the engine while the
        # other new instances are still being instantiated (side by side: in the pool's
        # next round).
        if self.started_now is not None:
            self.started_now.append(inst)
        else:
            self.resume(inst)

    # ===== end =====

    def caller(self, key: int) -> Instance:
        inst = self.by_ctx.get(key)
        if inst is None or not inst.alive:
            raise HostCallError("call from an instance that has ended")
        return inst

    def kill(self, inst: Instance, reason: str) -> None:
        """End an instance. Safe from host calls: the end happens between guest runs."""
        if inst.alive and inst.kill_reason is None:
            inst.kill_reason = reason
            self._pending_end.append(inst)

    def end_pending(self) -> None:
        while self._pending_end:
            inst = self._pending_end.pop()
            if inst.alive:
                self.end(inst, False, inst.kill_reason)

    def end(self, inst: Instance, ok: bool, error: str | None) -> None:
        """End ``inst`` now (outside a guest call) and release what it holds."""
        if not inst.alive:
            return
        inst.alive = False
        self.cpu_share.forget(inst)
        if inst.tree is not None:
            self.live_guests -= 1
            inst.tree.live -= 1
        self.mid_submission.discard(inst.seq)
        for child in inst.children:  # they belong to it (ended between guest runs)
            child.parent = None
            self.kill(child, f"its parent {inst.id} ended")
        inst.children = []
        if inst.parent is not None:
            inst.parent.children.remove(inst)
            inst.parent = None
        if inst.cohort is not None:
            self.first_turn_over(inst)
        if inst.call is not None:
            inst.call.cancel()
        inst.pages.release_all()
        self.rt.exports.drop_owner(inst.seq)
        self.rt.handles.drop_owner(inst.seq)
        self.batcher.remove_owner(inst.seq)
        self.messaging.drop_instance(inst)
        self.to_close.add(inst.store)
        self.memory.forget(inst)
        self.by_ctx.pop(inst.store.key, None)
        self.by_seq.pop(inst.seq, None)
        self.instances.pop(inst.id, None)
        if inst.job is not None:
            completions.on_instance_end(inst, error)
        inst.child_ends = {}
        inst.ended.resolve(Ok(None) if ok else Err(error or "ended"))
        inst.handle._finish(InstanceResult(inst.id, ok, error, inst.cpu_s, inst.tokens))

    def end_all(self, reason: str) -> None:
        for inst in list(self.instances.values()):
            self.end(inst, False, reason)
        self.to_close.free_all()


def call_failure(inst: Instance) -> str | None:
    """Why ``inst``'s finished call failed (a trap, a host error, run's result), if it did."""
    assert inst.call is not None
    err = inst.call.error()
    if err is not None:
        return wasm_ffi.LAST_HOST_ERROR.get(inst.store.key) or trap_summary(err)
    if inst.side.programs.is_core(inst.program):
        code = int(inst.call.results[0].of.i32)
        return None if code == 0 else (inst.native_error or f"run returned {code}")
    return wasm_ffi.decode_run_result(inst.call.results)
