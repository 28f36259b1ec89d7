"""The inferlet runtime: one thread that runs every instance on wasmtime fibers.

Loop, per turn:
1. take requests posted by other threads (launch, client message, kill);
2. take engine results, resolve futures, wake the instances waiting on them;
3. run eager commands at the head of every queue (allocate, free, copy, mask, ...);
4. fire a forward batch if the policy says so (at most one in flight);
5. resume each runnable instance once: it runs until it waits on a future, finishes, or
   its time slice (an epoch tick) ends;
6. if the engine is still free, fire what the guests just submitted (the ``adaptive``
   policy holds a batch in step 4 for this when the runnable guests would add as many
   tokens as wait and their turns take less than an engine step).
A guest that waits is suspended inside ``types.poll`` and costs nothing until woken.
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from loom.config import EngineConfig
from loom.engine.batch import ForwardBatch
from loom.engine.grammar import GrammarCompiler
from loom.engine.page_pool import PagePool
from loom.engine.prefix_cache import PrefixCache
from loom.engine.sampling_state import StateSpec
from loom.engine.worker import (
    ChunkStep,
    EngineWorker,
    ExecuteOp,
    GenPlan,
    NudgeOp,
    SamplingStateOp,
    SetLiveOp,
    start_worker,
)
from loom.engine.worker.cpu_placement import (
    UNPINNED,
    CpuPlacement,
    allowed_cpus,
    pin_current_thread,
    plan,
)
from loom.models.config import ModelConfig
from loom.models.tokenizer import Tokenizer
from loom.runtime import completions, context_cache
from loom.runtime.batcher import Batcher, take_forward_run, take_pass_ahead
from loom.runtime.cohort import Cohort
from loom.runtime.commands import (
    AllocateCmd,
    CommandQueue,
    CopyCmd,
    ExportCmd,
    ForwardCmd,
    FreeCmd,
    GenerateCmd,
    MaskCmd,
    SyncCmd,
    UnexportCmd,
    head_tokens,
)
from loom.runtime.completions import CompletionHandle, CompletionRequest
from loom.runtime.futures import Mailbox, Stream
from loom.runtime.host.forward_pass import forward_output, output_spec
from loom.runtime.host_core import register_core
from loom.runtime.inbox import Call, InboxMessage, Launch, LaunchBatch, StartCompletion
from loom.runtime.instance import (
    Deliver,
    EventListener,
    Instance,
    InstanceHandle,
    InstanceResult,
    Kill,
)
from loom.runtime.limits import RuntimeConfig
from loom.runtime.microserving import Microserving
from loom.runtime.program_cache import ProgramCache
from loom.runtime.resources import ExportRegistry, HandleTable, InstancePages
from loom.runtime.services import RuntimeStats
from loom.runtime.wasm import ffi as wasm_ffi
from loom.runtime.wasm.ffi import ComponentLinker, GuestStore, HostCallError, WasmEngine

_log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Flight:
    """A batch in the engine: which command produced which slice of the outputs."""

    parts: list[tuple[Instance, CommandQueue, ForwardCmd | GenerateCmd, int, int]]
    plans: dict[int, int] = field(default_factory=dict)  # part index -> plan index
    submitted_at: float = field(default_factory=time.perf_counter)
    kv_sends: bool = False  # the result comes as (result, transfer results)
    nudged: bool = False  # the worker was told to cut its generation chunk short
    step0_done: bool = False  # the batch's own step was taken from a ``ChunkStep``
    replayed: dict[int, int] = field(default_factory=dict)  # part -> continued tokens taken
    forward_enqueued: int = 0  # the runtime's count of forward commands when it fired
    # Passes of decode loops (``step-chain``) in it, and how many of their next steps are
    # queued ahead: once all are, the next batch can go without waiting for the pass's
    # other guests (instances starting, say).
    chained_parts: int = 0
    followers_queued: int = 0
    ahead_tried: bool = False


class Runtime:
    def __init__(
        self,
        worker: EngineWorker,
        config: RuntimeConfig | None = None,
        *,
        cache_dir: Path | None = None,
        model_name: str | None = None,
        wake: threading.Event | None = None,
        placement: CpuPlacement = UNPINNED,
    ) -> None:
        """``wake`` is the event the worker's ``on_ready`` sets (see ``start_runtime``);
        the loop's thread runs on ``placement.runtime`` (the worker's placement)."""
        self.config = config = config or RuntimeConfig()
        self.placement = placement
        config.validate()
        self.worker = worker
        info = worker.info
        self.page_size = info.page_size
        self.vocab_size = info.vocab_size
        self.tokenizer = Tokenizer.from_dir(info.model_dir)
        # Checks constraints (JSON schema, regex, grammar) where requests arrive; the
        # worker's engine runs their matchers.
        self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size)
        self.model_config = ModelConfig.from_dir(info.model_dir)
        self.model_name = model_name or Path(info.model_dir).name
        self.max_model_len = info.max_model_len
        self.eos_token_ids = tuple(info.eos_token_ids)
        self.pool = PagePool(info.num_pages, info.page_size)
        self.exports = ExportRegistry(self.pool)
        self.handles = HandleTable()
        self.batcher = Batcher(config)
        self.store_kv: dict[str, str] = {}
        self.topics: dict[str, list[tuple[Instance, Stream]]] = {}
        self.channels: dict[str, Mailbox] = {}
        self.stats = RuntimeStats()
        # Full pages of finished host completions, matched by later prompts; the pool's
        # reclaimer, so cached pages are given back whenever allocation runs short.
        self.prefix_cache = PrefixCache(self.pool, enabled=info.prefix_caching)

        self.wasm = WasmEngine()
        self.programs = ProgramCache(self.wasm, cache_dir)
        self.linker = ComponentLinker(self.wasm)
        from loom.runtime.host import register_all

        register_all(self.linker, self)
        self.linker.build()
        self.core_linker = wasm_ffi.CoreLinker(self.wasm)  # native (C/Zig) inferlets
        register_core(self.core_linker, self)

        self.instances: dict[str, Instance] = {}
        self.by_ctx: dict[int, Instance] = {}
        self.by_seq: dict[int, Instance] = {}
        self._seq = itertools.count()
        self._state_ids = itertools.count(1)
        self._runq: deque[Instance] = deque()
        self._inbox: deque[InboxMessage] = deque()
        self._wake = wake or threading.Event()
        self._poked = False
        self._flight: dict[int, _Flight | None] = {}  # op id -> batch (None: a page op)
        self._op_callbacks: dict[int, Callable[[Any], None]] = {}  # op id -> its reader
        self._chunk_flight: _Flight | None = None  # the batch in flight, if it has plans
        self._forward_enqueued = 0  # forward-kind commands ever queued (nudge decisions)
        self._largest_since_fire = 0  # most tokens of a forward queued since a batch fired
        # Moving averages for the adaptive policy: a guest's turn that ends waiting on a
        # pass it submitted, and an engine step.
        self._guest_turn_s = 0.0
        self._engine_step_s = 0.0
        self.microserving = Microserving(self, config.reservation_ttl_s)
        self._batch_inflight = False
        self._idle_since: float | None = None  # the engine went free with work ready
        self._last_flight: _Flight | None = None  # the batch sent last, while in flight
        # Guests whose time slice ended in the middle of submitting forward work (sibling
        # forks, say; or an instance starting, its prefill queued, still in Python): each
        # gets one more slice before the batch fires, so its passes ride together. A guest
        # leaves the set when it next waits or ends; the hold lasts one loop turn at most,
        # so a guest that spins cannot stall the engine.
        self._mid_submission: set[int] = set()
        self._pending_end: list[Instance] = []
        self._cohorts: list[Cohort] = []  # launch cohorts still starting
        self._stop = False
        self._thread: threading.Thread | None = None
        self._ticker: threading.Thread | None = None
        self._lock = threading.Lock()

    # ===== public, thread-safe =====

    def add_program(self, wasm: bytes) -> str:
        """Compile (or load from cache) a program; returns its hash for ``launch``."""
        with self._lock:
            return self.programs.add(wasm)

    def launch(
        self,
        program: str,
        arguments: list[str] | None = None,
        listener: EventListener | None = None,
    ) -> InstanceHandle:
        """Start an instance of an added program. ``listener`` receives its events on the
        runtime thread (see ``InstanceHandle``); without one, messages queue on the handle."""
        if program not in self.programs:
            raise KeyError(f"no program with hash {program}; add it first")
        handle = InstanceHandle(uuid.uuid4().hex[:12], self.post, listener)
        self.post(Launch(handle, program, list(arguments or [])))
        return handle

    def launch_batch(
        self, program: str, arguments: list[list[str]], listener: EventListener | None = None
    ) -> list[InstanceHandle]:
        """Start one instance per argument list as a cohort: their forward work is held
        until every one has reached its first wait, then rides the same engine passes
        (see ``cohort``), as ``LLM.generate`` batches a list of prompts. Best for offline
        batches; each instance's first token comes after the whole cohort started."""
        if program not in self.programs:
            raise KeyError(f"no program with hash {program}; add it first")
        handles = [InstanceHandle(uuid.uuid4().hex[:12], self.post, listener) for _ in arguments]
        args = [list(a) for a in arguments]
        self.post(LaunchBatch(handles, program, args))
        return handles

    def submit_completion(self, request: CompletionRequest) -> CompletionHandle:
        """Queue a host-driven generation (no guest); its steps batch with inferlet work."""
        handle = completions.new_handle(self.post)
        self.post(StartCompletion(handle.id, request))
        return handle

    def start(self) -> Runtime:
        if self.config.freeze_gc:
            # Everything loaded so far (torch, the tokenizer, compiled programs) lives for
            # the whole process: moving it out of the collector's generations keeps each
            # collection proportional to the live instances' objects alone.
            gc.collect()
            gc.freeze()
        self._thread = threading.Thread(target=self._loop, name="loom-runtime", daemon=True)
        self._thread.start()
        self._ticker = threading.Thread(target=self._tick, name="loom-epoch", daemon=True)
        self._ticker.start()
        return self

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._ticker is not None:
            self._ticker.join(timeout=5)

    def close(self) -> None:
        """Stop the runtime and its engine worker."""
        self.stop()
        self.worker.close()

    def __enter__(self) -> Runtime:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def call_soon(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on the runtime thread (for inspection from tests and the server)."""
        self.post(Call(fn))

    def query(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run ``fn`` on the runtime thread and return its value."""
        box: list[Any] = []
        done = threading.Event()

        def run() -> None:
            box.append(fn())
            done.set()

        self.call_soon(run)
        if not done.wait(timeout):
            raise TimeoutError("runtime thread did not answer")
        return box[0]

    def post(self, item: InboxMessage) -> None:
        """Hand the runtime thread a message (any thread); taken in order next turn."""
        self._inbox.append(item)
        self._wake.set()

    def _tick(self) -> None:
        # The epoch clock: each tick ends the running guest's time slice.
        period = self.config.slice_ms / 1000.0
        while not self._stop:
            time.sleep(period)
            self.wasm.increment_epoch()

    # ===== the loop =====

    def _loop(self) -> None:
        pin_current_thread(self.placement.runtime_cores)
        while not self._stop:
            t0 = time.perf_counter()
            self.stats.turns += 1
            # Clear before looking at any state: a wake-up posted from now on is not lost.
            # (Most turns find it clear; ``clear`` itself runs three Python functions.)
            if self._wake.is_set():
                self._wake.clear()
            self._process_inbox()  # (``_advance_queues`` below answers any poke)
            if self.microserving.reservations:
                self.microserving.expire(time.monotonic())
            cohort_s = self._release_stalled() if self._cohorts else None
            self._drain_engine()
            self._advance_queues()
            wait_s = self._maybe_fire(before_guests=True)
            ran = self._run_guests()
            self._end_pending()
            if ran and not self._batch_inflight:
                # What the guests just submitted rides the batch the engine is free for.
                self._advance_queues()
                wait_s = self._maybe_fire()
            if ran and self._batch_inflight:
                self._maybe_fire_ahead()
            if ran:
                self.stats.loop_s += time.perf_counter() - t0
            if not self._runq and not self._inbox and not self._poked:
                if wait_s is None and not self._batch_inflight:
                    self._idle_since = None  # nothing to run: idle for want of work
                timeout = 0.05 if wait_s is None else max(0.0, wait_s)
                if cohort_s is not None:
                    timeout = min(timeout, cohort_s)
                self._wake.wait(timeout)
        for inst in list(self.instances.values()):
            self._end(inst, False, "the runtime stopped")

    def _process_inbox(self) -> None:
        while self._inbox:
            item = self._inbox.popleft()
            if isinstance(item, Launch):
                self._spawn(item.handle, item.program, item.args)
            elif isinstance(item, LaunchBatch):
                self._spawn_cohort(item.handles, item.program, item.args)
            elif isinstance(item, Deliver):
                inst = self.instances.get(item.instance_id)
                if inst is not None:
                    inst.inbox.deliver(item.message)
            elif isinstance(item, Kill):
                inst = self.instances.get(item.instance_id)
                if inst is not None:
                    self.kill(inst, item.reason)
            elif isinstance(item, Call):
                item.fn()
            elif isinstance(item, StartCompletion):
                completions.start_completion(self, self.prefix_cache, item.handle_id, item.request)

    def _spawn_cohort(
        self, handles: list[InstanceHandle], program: str, args: list[list[str]]
    ) -> None:
        cohort = Cohort(set(), time.perf_counter())
        for handle, a in zip(handles, args, strict=True):
            inst = self._spawn(handle, program, a)
            if inst is not None and inst.alive:
                inst.cohort = cohort
                cohort.starting.add(inst.seq)
        if cohort.starting:
            self._cohorts.append(cohort)

    def _first_turn_over(self, inst: Instance) -> None:
        cohort: Cohort = inst.cohort
        inst.cohort = None
        if cohort.first_turn_over(inst.seq, time.perf_counter()):
            self._release(cohort)

    def _release(self, cohort: Cohort) -> None:
        cohort.release()
        self._cohorts.remove(cohort)
        self._poked = True  # its held work is ready: a turn more to fire it

    def _release_stalled(self) -> float:
        """Release cohorts none of whose members ended a first turn for the hold limit;
        seconds until the next one would be."""
        now = time.perf_counter()
        hold_s = self.config.cohort_hold_ms / 1000.0
        for cohort in list(self._cohorts):
            if cohort.stalled(now, hold_s):
                self._release(cohort)
        if not self._cohorts:
            return hold_s
        return max(0.0, min(c.last_progress for c in self._cohorts) + hold_s - now)

    def _spawn(self, handle: InstanceHandle, program: str, args: list[str]) -> Instance | None:
        if len(self.instances) >= self.config.max_instances:
            handle._finish(InstanceResult(handle.id, False, "too many instances", 0.0, 0))
            return None
        store = GuestStore(
            self.wasm,
            memory_limit=self.config.memory_limit_bytes,
            slice_ticks=1,
        )
        inst = Instance(
            seq=self.next_seq(),
            id=handle.id,
            program=program,
            arguments=args,
            store=store,
            pages=InstancePages(self.pool),
            handle=handle,
            spawned_at=time.perf_counter(),
        )
        self.register_instance(inst)
        if self.programs.is_core(program):
            # A native inferlet instantiates at once (no start code runs); `run` next.
            try:
                core = self.core_linker.instantiate(store, self.programs.get_core(program))
                inst.call = self.core_linker.call_async(store, core, "run")
            except wasm_ffi.WasmError as e:
                self._end(inst, False, f"cannot start the native inferlet: {e}")
                return inst
            inst.started = True
            inst.spawn_s = time.perf_counter() - inst.spawned_at
            self.stats.spawn_s.append(inst.spawn_s)
        else:
            inst.call = wasm_ffi.instantiate_async(self.linker, store, self.programs.get(program))
        self.stats.spawned += 1
        self._make_runnable(inst)
        return inst

    def next_seq(self) -> int:
        return next(self._seq)

    def register_instance(self, inst: Instance) -> None:
        self.instances[inst.id] = inst
        self.by_ctx[inst.store.key] = inst
        self.by_seq[inst.seq] = inst

    def end_instance(self, inst: Instance, ok: bool, error: str | None) -> None:
        """End an instance now (runtime thread, outside a guest call)."""
        self._end(inst, ok, error)

    def submit_op(self, op: Any, callback: Callable[[Any], None]) -> None:
        """Runtime thread: send ``op`` to the engine worker; ``callback(result)`` runs on
        this thread when it is done (the result may be an exception)."""
        self._op_callbacks[self.worker.submit(op)] = callback

    def _make_runnable(self, inst: Instance) -> None:
        if inst.alive and not inst.queued:
            inst.queued = True
            self._runq.append(inst)

    def waker(self, inst: Instance) -> Callable[[], None]:
        """A callable putting ``inst`` on the run queue (one per instance: every wait of
        every forward pass needs one)."""
        wake = inst.wake
        if wake is None:
            wake = inst.wake = lambda: self._make_runnable(inst)
        return wake

    def _run_guests(self) -> bool:
        n = len(self._runq)
        if not n:
            return False
        tried_fire = False
        for _ in range(n):
            inst = self._runq.popleft()
            inst.queued = False
            if not inst.alive or inst.call is None:
                continue
            if inst.blocked is not None and not inst.blocked.ready():
                continue  # a spurious wake: still waiting
            self._resume(inst)
            if inst.seq in self._mid_submission and inst.alive and inst.blocked is None:
                # Its slice ended in the middle of submitting (an instance starting, or
                # sibling forks): one more slice now, so its work is whole before a batch
                # fires, instead of holding every batch until the pass comes back to it.
                self._resume(inst)
            last = self._last_flight
            if (
                last is not None
                and not last.ahead_tried
                and 0 < last.chained_parts <= last.followers_queued
                and self._batch_inflight
            ):
                last.ahead_tried = True  # every decode loop in it queued its next step
                self._maybe_fire_ahead(mid_pass=True)
            # A prefill arrived that outweighs what the rest of the pass is likely to add
            # (a decode token each), or work waits that no guest of this pass adds to
            # (host generations, passes ahead): if the engine is free, fire now rather
            # than after every guest ran. Decode steps of guests that wait on each pass
            # never fire mid-pass, else the woken guests would split into cohorts again.
            # A long pass (many instances starting, ~3-6 ms each) looks for the engine's
            # result after each guest, so the engine goes on working batch after batch
            # instead of idling until the pass ends. One attempt per time the engine is
            # found free: it scans every queue.
            prefill_waits = self._largest_since_fire > len(self._runq)
            if self._batch_inflight and (prefill_waits or self._wake.is_set()):
                self._drain_engine()
                if not self._batch_inflight:
                    tried_fire = False
            if (
                not tried_fire
                and not self._batch_inflight
                and not self._mid_submission  # not before those guests are done
                and (prefill_waits or self._guestless_work_ready())
            ):
                tried_fire = True
                self._advance_queues()
                self._maybe_fire(before_guests=True)
        return True

    def _guestless_work_ready(self) -> bool:
        """A head that no guest's turn adds to: a host generation or a pass ahead."""
        for q in self.batcher.queues:
            cmds, head = q.cmds, q.head
            if head < len(cmds) and not q.held:
                cmd = cmds[head]
                if isinstance(cmd, GenerateCmd) or (
                    isinstance(cmd, ForwardCmd) and cmd.is_ahead and cmd.ready()
                ):
                    return True
        return False

    def _resume(self, inst: Instance) -> None:
        """Run ``inst`` until it waits, finishes or its time slice ends."""
        assert inst.call is not None
        inst.blocked = None
        inst.store.fresh_slice()
        t0 = time.perf_counter()
        done = inst.call.poll()
        dt = time.perf_counter() - t0
        inst.cpu_s += dt
        self.stats.poll_s += dt
        self.stats.guest_polls += 1
        if done or inst.blocked is not None:
            self._mid_submission.discard(inst.seq)
        if not done and inst.submitted:
            if inst.blocked is None:
                self._mid_submission.add(inst.seq)  # preempted: let it finish first
            else:  # a whole turn: submitted a pass and waits for it (batching decisions)
                self._guest_turn_s += 0.1 * (dt - self._guest_turn_s)
        inst.submitted = False
        if inst.cohort is not None and inst.started and (done or inst.blocked is not None):
            self._first_turn_over(inst)
        if inst.kill_reason is not None:
            self._end(inst, False, inst.kill_reason)
        elif done:
            self._on_call_done(inst)
        elif inst.cpu_s > self.config.cpu_budget_s:
            self._end(inst, False, f"CPU budget of {self.config.cpu_budget_s:g} s exceeded")
        elif inst.blocked is None or inst.blocked.ready():
            self._make_runnable(inst)  # its time slice ended (or it is ready already)

    def _on_call_done(self, inst: Instance) -> None:
        assert inst.call is not None
        err = inst.call.error()
        if err is not None:
            host_msg = wasm_ffi.LAST_HOST_ERROR.get(inst.store.key)
            self._end(inst, False, host_msg or _trap_summary(err))
            return
        if not inst.started:
            inst.started = True
            inst.spawn_s = time.perf_counter() - inst.spawned_at
            self.stats.spawn_s.append(inst.spawn_s)
            try:
                inst.call = wasm_ffi.call_export_async(
                    inst.store, self.programs.get(inst.program), "run"
                )
            except wasm_ffi.WasmError as e:
                self._end(inst, False, str(e))
                return
            # Straight on into ``main``: its first forward can reach the engine while the
            # other new instances are still being instantiated.
            self._resume(inst)
            return
        if self.programs.is_core(inst.program):
            code = int(inst.call.results[0].of.i32)
            failure = None if code == 0 else (inst.native_error or f"run returned {code}")
        else:
            failure = wasm_ffi.decode_run_result(inst.call.results)
        self._end(inst, failure is None, failure)

    def kill(self, inst: Instance, reason: str) -> None:
        """End an instance. Safe from host calls: the end happens between guest runs."""
        if inst.alive and inst.kill_reason is None:
            inst.kill_reason = reason
            self._pending_end.append(inst)

    def _end_pending(self) -> None:
        while self._pending_end:
            inst = self._pending_end.pop()
            if inst.alive:
                self._end(inst, False, inst.kill_reason)

    def _end(self, inst: Instance, ok: bool, error: str | None) -> None:
        if not inst.alive:
            return
        inst.alive = False
        self._mid_submission.discard(inst.seq)
        if inst.cohort is not None:
            self._first_turn_over(inst)
        if inst.call is not None:
            inst.call.cancel()
        inst.pages.release_all()
        self.exports.drop_owner(inst.seq)
        self.handles.drop_owner(inst.seq)
        self.batcher.remove_owner(inst.seq)
        for topic, stream in inst.subscriptions:
            subs = self.topics.get(topic, [])
            self.topics[topic] = [(i, s) for i, s in subs if s is not stream]
        inst.store.close()
        self.by_ctx.pop(inst.store.key, None)
        self.by_seq.pop(inst.seq, None)
        self.instances.pop(inst.id, None)
        if inst.job is not None:
            completions.on_instance_end(inst, error)
        inst.handle._finish(InstanceResult(inst.id, ok, error, inst.cpu_s, inst.tokens))

    # ===== instance lookups for host functions =====

    def caller(self, key: int) -> Instance:
        inst = self.by_ctx.get(key)
        if inst is None or not inst.alive:
            raise HostCallError("call from an instance that has ended")
        return inst

    def send_to_client(self, inst: Instance, message: str) -> None:
        if len(message.encode()) > self.config.max_message_bytes:
            raise HostCallError(
                f"message of {len(message.encode())} bytes exceeds the cap of "
                f"{self.config.max_message_bytes}"
            )
        listener = inst.handle.listener
        if listener is not None:
            listener("message", message)
            return
        if inst.handle.messages.qsize() >= self.config.max_pending_messages:
            raise HostCallError(
                f"more than {self.config.max_pending_messages} unread messages to the client"
            )
        inst.handle.messages.put(message)

    def new_queue(self, inst: Instance) -> CommandQueue:
        q = CommandQueue(owner=inst.seq)
        if inst.cohort is not None:
            inst.cohort.hold(q)
        inst.queues.append(q)
        self.batcher.add_queue(q)
        return q

    def enqueue(self, q: CommandQueue, cmd: Any) -> None:
        if isinstance(cmd, GenerateCmd) and cmd.task.needs_state:
            self._start_state(cmd.task)
        if isinstance(cmd, (ForwardCmd, GenerateCmd)):
            self._forward_enqueued += 1
            n = cmd.num_tokens
            if n > self._largest_since_fire:
                self._largest_since_fire = n
            cmd.submitted_at = time.perf_counter()
            src = getattr(cmd, "ahead_of", None)
            if src is not None and src.flight is not None:
                src.flight.followers_queued += 1
            owner = self.by_seq.get(q.owner)
            if owner is not None:
                owner.submitted = True
        q.push(cmd)
        # Host functions run on this (the loop's) thread: a flag the loop reads before it
        # sleeps is enough, and costs nothing next to an Event.
        self._poked = True

    def _start_state(self, task: Any) -> None:
        """The engine's sampling state of a constrained or penalized generation, started
        ahead of its first step (worker ops run in order); ``_end_state`` at its end."""
        task.state_id = next(self._state_ids)
        spec = StateSpec(
            task.state_id, task.grammar, tuple(task.grammar_prefix), task.presence_penalty,
            task.frequency_penalty, tuple(task.tokens),
        )  # fmt: skip
        self.submit_op(SamplingStateOp(start=[spec]), self._state_failed)

    def _end_state(self, task: Any) -> None:
        if task.state_id is not None:
            self.submit_op(SamplingStateOp(end=[task.state_id]), self._state_failed)
            task.state_id = None

    def _state_failed(self, result: Any) -> None:
        # Grammars are compiled and checked here before they reach the worker; one that
        # fails there anyway leaves its rows at end-of-sequence only (``SamplingStates``).
        if isinstance(result, BaseException):
            _log.warning("sampling state: %s", result)

    # ===== eager commands =====

    def _advance_queues(self) -> None:
        # Every turn looks at every queue (twice): a decode loop's queue holds a forward
        # command or nothing, seen here without a method call per queue.
        # What host functions enqueued so far is looked at now, and forward work right
        # after (fired, left to a batch in flight, or held by the policy with a timeout):
        # the loop needs no turn more for it before it sleeps (``_fire`` asks for one when
        # commands wait behind the passes it took).
        self._poked = False
        for q in self.batcher.queues:
            while True:
                cmds, head = q.cmds, q.head
                if head >= len(cmds):
                    break
                cmd = cmds[head]
                if isinstance(cmd, (ForwardCmd, GenerateCmd)):
                    break
                inst = self._owner(q)
                if inst is None:
                    break
                if not self._run_eager(inst, q, cmd):
                    break
                q.pop()

    def _owner(self, q: CommandQueue) -> Instance | None:
        return self.by_seq.get(q.owner)

    def _run_eager(self, inst: Instance, q: CommandQueue, cmd: Any) -> bool:
        """Run one eager command; False when it must wait (the queue stays blocked)."""
        try:
            if isinstance(cmd, AllocateCmd):
                pages = self.allocate_pages(inst, len(cmd.virtual), cmd)
                if pages is None:
                    return False
                inst.pages.bind(cmd.virtual, pages)
            elif isinstance(cmd, FreeCmd):
                inst.pages.release(cmd.virtual)
            elif isinstance(cmd, CopyCmd):
                (src,) = inst.pages.physical([cmd.src])
                dst = context_cache.own_page(self, inst, cmd.dst)  # copy-on-write
                if dst is None:
                    return False
                context_cache.fresh_copy(
                    self, src, dst, cmd.src_offset, cmd.dst_offset, cmd.size
                )  # fmt: skip
            elif isinstance(cmd, MaskCmd):
                page = context_cache.own_page(self, inst, cmd.page)  # copy-on-write
                if page is None:
                    return False
                self.track_op(SetLiveOp(page, cmd.keep))
            elif isinstance(cmd, ExportCmd):
                self.exports.add(
                    cmd.name, inst.pages.physical(cmd.virtual), inst.seq, cmd.persistent
                )
            elif isinstance(cmd, UnexportCmd):
                self.exports.remove(cmd.name)
            elif isinstance(cmd, SyncCmd):
                if q.inflight:
                    return False
                cmd.future.resolve(not q.failed)
        except HostCallError as e:
            self.kill(inst, str(e))
            return False
        return True

    def track_op(self, op: Any) -> None:
        """Submit an engine op whose result nobody waits for (errors still surface)."""
        self._flight[self.worker.submit(op)] = None

    def allocate_pages(
        self, inst: Instance, n: int, cmd: AllocateCmd | None = None
    ) -> list[int] | None:
        """Physical pages for ``inst``, or None to wait (the out-of-pages policy)."""
        if self.pool.can_allocate(n):
            return self.pool.allocate(n)
        if n > self.pool.num_pages:
            self.kill(inst, f"asked for {n} KV pages; the pool has {self.pool.num_pages}")
            return None
        if self.config.out_of_pages == "kill-newest":
            victims = [i for i in self.instances.values() if i.alive and i.kill_reason is None
                       and i.seq > inst.seq and i.pages.num_bound]  # fmt: skip
            if victims:
                victim = max(victims, key=lambda i: i.seq)
                self.kill(victim, "terminated to free KV pages for an older inferlet")
            else:
                self.kill(inst, "out of KV pages")
            return None
        now = time.perf_counter()
        if cmd is not None:
            if not cmd.since:
                cmd.since = now
            elif now - cmd.since > self.config.page_wait_timeout_s:
                self.kill(
                    inst,
                    f"out of KV pages: waited {self.config.page_wait_timeout_s:g} s for {n} pages",
                )
        return None

    # ===== forward batches =====

    def _maybe_fire(self, before_guests: bool = False) -> float | None:
        if self._batch_inflight:  # one batch at a time: nothing to decide until it returns
            self._maybe_nudge()
            return None
        if self._mid_submission:  # set by the guest pass; cleared once the next is due
            if before_guests:
                self._mid_submission.clear()
            return None
        heads = self.batcher.ready_heads()
        if not heads:  # (what ``decide`` answers then, without asking it)
            return None
        decision = self.batcher.decide(
            self._batch_inflight,
            heads,
            time.perf_counter(),
            guests_idle=not self._runq,
            runnable_before_guests=len(self._runq) if before_guests else 0,
            guest_turn_s=self._guest_turn_s,
            engine_step_s=self._engine_step_s,
        )
        if not decision.fire:
            return decision.wait_s
        self._fire(heads)
        return None

    def _maybe_fire_ahead(self, mid_pass: bool = False) -> None:
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
        if not mid_pass and (self._mid_submission or self._runq):
            return
        last = self._last_flight
        if last is None or last.plans or last.kv_sends:
            return
        # (``_flight`` also holds page ops, as None: rarely, so count only then.)
        if len(self._flight) != 1 and sum(f is not None for f in self._flight.values()) != 1:
            return  # one batch queued behind the running one is enough
        self._advance_queues()  # page allocations queued before the passes ahead
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
            self._fire(heads, after=last)

    def _fire(self, heads: list[CommandQueue], after: _Flight | None = None) -> None:
        """Submit one batch of the forward work at ``heads``. ``after``: the batch in
        flight that passes ahead among the heads follow (their tokens come from it)."""
        tokens: list[int] = []
        positions: list[int] = []
        indptr = [0]
        tables: list[list[int]] = []
        lasts: list[int] = []
        outputs: list[Any] = []
        masks: list[list[list[int]] | None] = []
        any_mask = False
        parts = []
        kv_sends: list[Any] = []
        chain: list[tuple[int, int]] = []
        taken_heads: list[CommandQueue] = []
        only_generations = True  # every part a host-driven generation (chunks may follow)
        max_tokens = self.config.max_batch_tokens
        for q in heads:
            inst = self._owner(q)
            if inst is None:
                continue
            if tokens and len(tokens) + head_tokens(q) > max_tokens:
                break
            # A pass ahead of a running pass goes alone (its token is not known here).
            head = q.peek()
            ahead = after is not None and isinstance(head, ForwardCmd) and not head.ready()
            taken = take_pass_ahead(q) if ahead else take_forward_run(q)
            taken_heads.append(q)
            if q.head < len(q.cmds):
                self._poked = True  # what follows the passes taken may run now: a turn more
            for cmd in taken:
                try:
                    if isinstance(cmd, GenerateCmd):
                        seq = self._generate_inputs(inst, cmd)
                        if seq is None:
                            break  # waiting for pages
                        toks, pos, pages, last, outs, rows = seq
                    else:
                        if cmd.positions and cmd.positions[0] == 0:  # a context's first pass
                            context_cache.match_forward(self, inst, cmd)
                        toks, pos, last, outs, rows = (
                            cmd.tokens, cmd.positions, cmd.last_page_len, cmd.outputs, cmd.masks
                        )  # fmt: skip
                        pages = inst.pages.physical(cmd.pages)
                except HostCallError as e:
                    self.kill(inst, str(e))
                    break
                inst.tokens += len(toks)
                if inst.tokens > self.config.token_budget:
                    self.kill(inst, f"token budget of {self.config.token_budget} exceeded")
                    break
                base = len(tokens)
                out_start = len(outputs)
                tokens += toks
                positions += pos
                indptr.append(len(tokens))
                tables.append(pages)
                lasts.append(last)
                masks.append(rows)
                any_mask = any_mask or rows is not None
                for o in outs:
                    outputs.append(output_spec(o.index + base, o))
                parts.append((inst, q, cmd, out_start, len(outputs)))
                if isinstance(cmd, ForwardCmd):
                    only_generations = False
                    q.inflight += 1
                    if cmd.kv_send is not None:
                        kv_sends.append(cmd.kv_send)
                    cmd.out_index = out_start  # where a pass ahead finds its token
                    src = cmd.ahead_of
                    if src is not None and not src.future.done:
                        chain.append((base, src.out_index))
        if not parts:
            return
        batch = ForwardBatch(
            token_ids=tokens,
            positions=positions,
            seq_indptr=indptr,
            page_tables=tables,
            last_page_lens=lasts,
            outputs=outputs,
            masks=masks if any_mask else None,
        )
        flight = _Flight(parts, kv_sends=bool(kv_sends))
        for _, _, cmd, _, _ in parts:
            if isinstance(cmd, ForwardCmd):
                cmd.flight = flight
                if cmd.is_ahead or cmd.then is not None:
                    flight.chained_parts += 1
                    flight.followers_queued += cmd.then is not None
        plans: list[GenPlan] = []
        if (
            only_generations
            and after is None
            and len(taken_heads) == len(heads)
            and not self._runq
            and not self._inbox
        ):
            plans = self._plan_generations(flight)
        op = ExecuteOp(batch, self.pool.drain_fresh(), plans, kv_sends, chain)
        op_id = self.worker.submit(op)
        if self._idle_since is not None:
            self.stats.engine_idle_s += time.perf_counter() - self._idle_since
            self.stats.idle_gaps += 1
            self._idle_since = None
        self._largest_since_fire = 0
        self._chunk_flight = flight if plans else None
        flight.forward_enqueued = self._forward_enqueued
        self._flight[op_id] = flight
        self._last_flight = flight
        self._batch_inflight = True
        self.stats.batches += 1
        self.stats.forward_cmds += len(parts)
        self.stats.batch_sizes.append(len(parts))
        self.stats.batch_size_hist.observe(len(parts))
        self.stats.batch_tokens += len(tokens)
        if after is not None:
            self.stats.chained_batches += 1

    def _maybe_nudge(self) -> None:
        """While the worker runs a generation chunk, new forward work would wait for the
        whole chunk: tell the worker (once per batch) to hand back what it has."""
        flight = self._chunk_flight
        if flight is None or flight.nudged:
            return
        # A chunk is planned only when every forward head rode the batch and no guest was
        # runnable, so forward work enqueued since then (or a runnable guest) is new.
        if self._runq or self._forward_enqueued > flight.forward_enqueued:
            flight.nudged = True
            self.stats.nudges += 1
            self.submit_op(NudgeOp(), lambda _: None)

    def _plan_generations(self, flight: _Flight) -> list[GenPlan]:
        """When a batch holds only host-driven generations (the caller checks) and nothing
        else can arrive before it returns, let the worker go on with them for up to
        ``generate_chunk`` tokens (no round trip per token). Pages for those tokens are
        taken now, only if free; a generation that stops early gives the spare ones back."""
        chunk = self.config.generate_chunk
        if chunk <= 0:
            return []
        # A generation's first token goes out at once (time to first token); the chunks
        # only speed up the tokens after it.
        if any(not c.task.tokens for _, _, c, _, _ in flight.parts):  # type: ignore[union-attr]
            return []
        ps = self.page_size
        plans: list[GenPlan] = []
        for k, (inst, _, cmd, a, _) in enumerate(flight.parts):
            task = cmd.task  # type: ignore[union-attr]
            if task.logprobs is not None:
                continue  # the worker's continuation returns tokens only
            kv_after = task.kv_len + len(task.pending)
            steps = min(chunk, task.stop.max_tokens - len(task.tokens) - 1)
            if steps <= 0:
                continue
            extra = -(-(kv_after + steps) // ps) - len(task.pages)
            if extra > 0:
                if self.pool.can_allocate(extra):
                    task.pages += inst.pages.adopt(self.pool.allocate(extra))
                else:
                    steps = len(task.pages) * ps - kv_after
            if steps <= 0:
                continue
            flight.plans[k] = len(plans)
            plans.append(GenPlan(
                output=a, pages=inst.pages.physical(task.pages), kv_len=kv_after,
                position=task.position + len(task.pending), sampler=task.sampler,
                seed_count=len(task.tokens) + 1, stop_tokens=task.stop.stop_tokens,
                max_steps=steps, logit_mask=task.logit_mask, logit_bias=task.logit_bias,
                state=task.state_id,
            ))  # fmt: skip
        return plans

    def _generate_inputs(self, inst: Instance, cmd: GenerateCmd) -> Any:
        task = cmd.task
        extra = task.pages_needed(self.page_size)
        if extra:
            phys = self.allocate_pages(inst, extra)
            if phys is None:
                return None
            task.pages += inst.pages.adopt(phys)
        toks, pos, last, out = task.step_inputs(self.page_size)
        return toks, pos, inst.pages.physical(task.pages), last, [out], None

    def _drain_engine(self) -> None:
        for op_id, result in self.worker.drain():
            if isinstance(result, ChunkStep):
                progressing = self._flight.get(op_id)
                if progressing is not None:
                    self._on_chunk_step(progressing, result)
                continue
            callback = self._op_callbacks.pop(op_id, None)
            if callback is not None:
                callback(result)
                continue
            flight = self._flight.pop(op_id, None)
            if flight is None:  # a page op (copy/mask): its ids were checked when queued
                continue
            now = time.perf_counter()
            followers = [f for f in self._flight.values() if f is not None] if self._flight else []
            self._batch_inflight = bool(followers)
            if self._chunk_flight is flight:
                self._chunk_flight = None
            if self._last_flight is flight:
                self._last_flight = None
            for follower in followers:
                follower.submitted_at = now  # the engine starts on it now
            step_s = now - flight.submitted_at
            self.stats.step_latency.observe(step_s)
            if not flight.plans:  # one step (a generation chunk is many)
                self._engine_step_s += 0.2 * (step_s - self._engine_step_s)
            self._complete(flight, result)
            if not self._batch_inflight and self._work_pending():
                # From when the result arrived: the runtime may have been running guests.
                self._idle_since = min(now, self.worker.last_arrival or now)

    def _work_pending(self) -> bool:
        """Whether a guest may run or a command waits: the engine is idle for the runtime."""
        if self._runq or self._mid_submission:
            return True
        return any(q.head < len(q.cmds) for q in self.batcher.queues)

    def _trim_pages(self, inst: Instance, task: Any) -> None:
        """Give back pages a finished generation took ahead and did not fill."""
        keep = max(1, -(-task.kv_len // self.page_size)) if task.pages else 0
        spare = task.pages[keep:]
        if spare:
            del task.pages[keep:]
            if inst.alive:
                inst.pages.release(spare)

    def _complete(self, flight: _Flight, result: Any) -> None:
        failed = isinstance(result, BaseException)
        transfers: dict[str, Any] = {}
        if flight.kv_sends and not failed:
            result, sent = result
            transfers = {t.rid: t for t in sent}
        more: list[list[int]] = []
        if flight.plans and not failed:
            result, more = result
        self.stats.engine_passes += 1 + max(map(len, more), default=0)
        self.stats.pass_seqs += len(flight.parts) + sum(map(len, more))
        now = time.perf_counter()
        for k, (inst, q, cmd, a, b) in enumerate(flight.parts):
            if isinstance(cmd, ForwardCmd):
                if b > a and not failed and inst.alive:
                    inst.handle._note_tokens(now, 1)
                q.inflight -= 1
                cmd.flight = None
                if cmd.publish is not None:
                    context_cache.publish_forward(self, cmd, not failed)
                if cmd.kv_send is not None:
                    cmd.kv_result = transfers.get(cmd.kv_send.rid)
                if failed:
                    q.failed = True
                    cmd.future.resolve(wasm_ffi.Err(f"forward pass failed: {result}"))
                else:
                    cmd.future.resolve(wasm_ffi.Ok(forward_output(cmd.outputs, result[a:b])))
                if cmd.then is not None:
                    _fill_ahead(q, cmd, None if failed else result[a].token)
                continue
            task = cmd.task
            if not inst.alive:
                continue
            if failed:
                if task.finish_reason is None:
                    task.finish_reason = f"error: {result}"
            else:
                if not flight.step0_done:
                    self._take_tokens(inst, cmd, [result[a].token], result[a])
                if k in flight.plans:  # the tokens the worker went on to generate
                    made = more[flight.plans[k]]
                    self.stats.continued_tokens += len(made)
                    self._take_tokens(inst, cmd, made[flight.replayed.get(k, 0) :], None)
                    if task.finish_reason is None:
                        # A chunk cut short leaves pages taken ahead unfilled; the next
                        # step takes what it needs again.
                        self._trim_pages(inst, task)
            if task.finish_reason is not None:
                self._finish_generation(inst, q, cmd)

    def _on_chunk_step(self, flight: _Flight, step: ChunkStep) -> None:
        """One step of a generation chunk, while the worker goes on: its tokens stream out
        now. A generation that finishes here ends when the chunk returns (the worker may
        still write its pages), and the chunk is cut short for it."""
        finished = False
        if step.results is not None:  # the batch's own step
            flight.step0_done = True
            for inst, _, cmd, a, _ in flight.parts:
                if inst.alive and isinstance(cmd, GenerateCmd):
                    finished |= self._take_tokens(
                        inst, cmd, [step.results[a].token], step.results[a]
                    )
        elif step.tokens is not None:
            for k, j in flight.plans.items():
                tok = step.tokens[j]
                if tok is None:
                    continue
                flight.replayed[k] = flight.replayed.get(k, 0) + 1
                inst, _, cmd, _, _ = flight.parts[k]
                if inst.alive and isinstance(cmd, GenerateCmd):
                    finished |= self._take_tokens(inst, cmd, [tok], None)
        if finished and not flight.nudged:
            flight.nudged = True
            self.stats.nudges += 1
            self.submit_op(NudgeOp(), lambda _: None)

    def _take_tokens(
        self, inst: Instance, cmd: GenerateCmd, tokens: Sequence[int | None], first: Any
    ) -> bool:
        """Feed a generation the tokens sampled for it (``first``: the result of the
        batch's own step, kept when it asked for logprobs); True when it finished here.
        Tokens after its end are dropped (their slots stay unused)."""
        task = cmd.task
        if task.finish_reason is not None:
            return False
        if task.cache_prompt is not None:  # its prompt's KV is written now
            context_cache.publish_generation(self, inst, task)
        if first is not None and task.logprobs is not None:
            task.outputs.append(first)
        if tokens:
            inst.handle._note_tokens(time.perf_counter(), len(tokens))
        for tok in tokens:
            assert tok is not None
            self.stats.sampled_tokens += 1
            delta = task.on_token(tok)
            if task.on_delta is not None:
                # (With logprobs a generation is never continued by the worker: one token
                # per step, and ``first`` is its result.)
                task.on_delta(delta, tok, first)
            elif task.stream and delta:
                try:
                    self.send_to_client(inst, delta)
                except HostCallError as e:
                    self.kill(inst, str(e))
            if task.finish_reason is not None:
                return True
        return False

    def _finish_generation(self, inst: Instance, q: CommandQueue, cmd: GenerateCmd) -> None:
        task = cmd.task
        self._end_state(task)
        if q.peek() is cmd:
            q.pop()
        self._trim_pages(inst, task)
        task.future.resolve(
            wasm_ffi.Ok(
                (
                    task.tokens,
                    task.text,
                    task.finish_reason,
                    task.pages,
                    task.last_page_len(self.page_size),
                    [o.logprob or 0.0 for o in task.outputs] if task.logprobs is not None else [],
                )
            )
        )
        if task.on_finish is not None:
            task.on_finish(task)


def _fill_ahead(q: CommandQueue, cmd: ForwardCmd, token: int | None) -> None:
    """``cmd`` returned: the pass ahead of it gets its input, the token ``cmd`` sampled;
    if ``cmd`` failed (no token), the pass ahead fails with it, never run."""
    ahead = cmd.then
    assert ahead is not None
    cmd.then = None
    ahead.ahead_of = None  # (links kept would hold every step of a long loop alive)
    if token is not None:
        ahead.tokens = [token]
        return
    if q.ahead is ahead:
        q.ahead = None
    if q.withdraw(ahead):
        ahead.future.resolve(wasm_ffi.Err("the pass before it failed"))


def _trap_summary(err: str) -> str:
    """The first line and the cause of a wasmtime error (the backtrace is noise to users)."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    cause = ""
    if "Caused by:" in err:
        cause = err.split("Caused by:", 1)[1].strip().splitlines()[0].strip()
    head = lines[0] if lines else err
    if "wasm backtrace" in head:
        head = "the inferlet trapped"
    return f"{head}: {cause}" if cause else head


__all__ = ["Runtime", "RuntimeConfig", "RuntimeStats", "start_runtime"]


def start_runtime(
    engine_config: EngineConfig,
    config: RuntimeConfig | None = None,
    *,
    worker_mode: Literal["process", "thread"] = "process",
    cache_dir: Path | None = None,
    engine_threads: int | None = None,
    pin_cpus: bool = True,
    engine_idle_spin_s: float | None = None,
) -> Runtime:
    """Start an engine worker and a runtime driving it (call ``stop`` and ``close_worker``).

    ``engine_threads``: torch threads of a process worker. By default every core but one,
    which is left to the runtime thread: an engine spreading over all cores preempts the
    thread that runs the guests and the host calls (on 2 cores, host time per call fell
    from 30–36 µs to ~25 µs and guest time per forward by a quarter with 1 engine thread).
    ``pin_cpus`` (process worker, two cores or more): keep the runtime thread on the first
    of this process's cores and the engine on the others (``cpu_placement``).
    ``engine_idle_spin_s``: how long a process worker polls for its next op after each one
    (None: ``engine_worker.IDLE_SPIN_S`` when pinned, else 0).
    """
    placement = UNPINNED
    if worker_mode == "process":
        if pin_cpus:
            placement = plan(allowed_cpus())
        if engine_threads is None:
            n = len(placement.engine) if placement.engine else (os.cpu_count() or 1) - 1
            engine_threads = max(1, n)
    wake = threading.Event()
    worker = start_worker(
        engine_config,
        mode=worker_mode,
        on_ready=wake.set,
        threads=engine_threads,
        placement=placement,
        idle_spin_s=engine_idle_spin_s,
    )
    rt = Runtime(worker, config, cache_dir=cache_dir, wake=wake, placement=placement)
    return rt.start()
