"""The inferlet runtime: one thread that runs every instance on wasmtime fibers (their
turns side by side on a pool of threads where there are cores for it, ``turns``).

``Runtime`` is a facade over the parts that do the work, each in a module of its own:
``guests`` (instances, their start, turns and end), ``eager`` (commands that run at once,
and the out-of-pages policy), ``dispatch`` (when forward work fires: ``assembly`` builds
the batch, ``fanout`` hands its results out), ``messaging`` (client messages, topics,
channels, the key-value store) and ``microserving``, which with host functions and
completions sees the runtime through ``services.RuntimeServices``.

Loop, per turn:
1. take requests posted by other threads (launch, client message, kill);
2. take engine results, resolve futures, wake the instances waiting on them;
3. run eager commands at the head of every queue (allocate, free, copy, mask, ...);
4. fire a forward batch if the policy says so (at most one in flight);
5. resume each runnable instance once: until it waits, finishes, or its slice ends;
6. if the engine is still free, fire what the guests just submitted (``adaptive`` holds
   step 4 for it when the guests would add as many tokens, in less than a step);
7. idle: free one ended instance's store, or wait for a wake-up.
"""

from __future__ import annotations

import gc
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from loom.config import EngineConfig, RuntimeConfig
from loom.engine.grammar import GrammarCompiler
from loom.engine.page_pool import PagePool
from loom.engine.prefix_cache import PrefixCache
from loom.engine.worker import EngineWorker, start_worker
from loom.engine.worker.cpu_placement import (
    UNPINNED,
    CpuPlacement,
    allowed_cpus,
    pin_current_thread,
    plan,
)
from loom.models.config import ModelConfig
from loom.models.tokenizer import Tokenizer
from loom.runtime import completions
from loom.runtime.batcher import Batcher
from loom.runtime.commands import CommandQueue
from loom.runtime.completions import CompletionHandle, CompletionRequest
from loom.runtime.cpu_share import SLICE_TICKS
from loom.runtime.dispatch import Dispatcher
from loom.runtime.eager import EagerCommands
from loom.runtime.guest_engines import GuestEngines
from loom.runtime.guests import Guests
from loom.runtime.host_core import register_core
from loom.runtime.inbox import Call, InboxMessage, Launch, LaunchBatch, StartCompletion
from loom.runtime.instance import Deliver, EventListener, Instance, InstanceHandle, Kill
from loom.runtime.limits import InstanceLimits
from loom.runtime.messaging import Messaging
from loom.runtime.microserving import Microserving
from loom.runtime.resources import ExportRegistry, HandleTable
from loom.runtime.services import RuntimeStats
from loom.runtime.supervision import WorkerSupervisor


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
        restart_worker: Callable[[], EngineWorker] | None = None,
    ) -> None:
        """``wake`` is the event the worker's ``on_ready`` sets (see ``start_runtime``);
        the loop's thread runs on ``placement.runtime`` (the worker's placement);
        ``restart_worker`` makes a new worker when this one dies (``supervision``)."""
        self.config = config = config or RuntimeConfig()
        self.placement = placement
        self.worker = worker
        info = worker.info
        self.page_size, self.vocab_size = info.page_size, info.vocab_size
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
        self.messaging = Messaging(config)
        self.stats = RuntimeStats()
        # Full pages of finished host completions, matched by later prompts; the pool's
        # reclaimer, so cached pages are given back whenever allocation runs short.
        self.prefix_cache = PrefixCache(self.pool, enabled=info.prefix_caching)
        self._inbox: deque[InboxMessage] = deque()
        self._wake = wake or threading.Event()

        self.engines = GuestEngines(config, cache_dir)  # (with the instance pool: two)
        self.wasm, self.programs = self.engines.own.engine, self.engines.own.programs
        self.guests = Guests(self, self.batcher, self.messaging,
                             on_cohort_release=self._on_cohort_release, post=self.post)  # fmt: skip
        self.instances = self.guests.instances
        self.eager = EagerCommands(self, self.batcher, self.guests)
        self.dispatch = Dispatcher(self, worker, self.batcher, self.guests, self.eager,
                                   self._inbox, self._wake)  # fmt: skip
        self._bind_parts()
        from loom.runtime.host import register_all

        for side in self.engines.sides():
            register_all(side.linker, self)
            side.linker.build()
            register_core(side.core_linker, self)
        self.microserving = Microserving(self, config.reservation_ttl_s)
        self.supervisor = WorkerSupervisor(self, restart_worker)
        self._stop = False
        self._thread: threading.Thread | None = None
        self._ticker: threading.Thread | None = None
        self._lock = threading.Lock()

    # ===== public, thread-safe =====

    def add_program(self, wasm: bytes) -> str:
        """Compile (or load from cache) a program; returns its hash for ``launch``."""
        with self._lock:
            return self.engines.add(wasm)

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
        if self.guests.turn_pool is not None:
            self.guests.turn_pool.close()

    def close(self) -> None:
        """Stop the runtime and its engine worker."""
        self.stop()
        self.worker.close()

    def __enter__(self) -> Runtime:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reconfigure(self, config: RuntimeConfig | None = None, **changes: Any) -> RuntimeConfig:
        """Change settings of the running runtime: ``config`` whole, or ``changes`` to
        fields of the current one (checked); returns the settings before, for a caller
        that puts them back. The parts take the new settings at their next decision."""
        before = self.config
        config = replace(config or before, **changes)
        self.config = self.batcher.config = self.messaging.config = config
        self.guests.config = self.dispatch.config = config
        self.guests.cpu_share.share = config.cpu_bound_share
        self.guests.cohorts.hold_s = config.cohort_hold_ms / 1000.0
        return before

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
        # The epoch clock: a guest's time slice ends at a tick. While some guest is
        # CPU-bound, ticks come SLICE_TICKS times as often (see ``cpu_share``).
        cpu_bound = self.guests.cpu_share.bound
        while not self._stop:
            period = self.config.slice_ms / 1000.0  # (``reconfigure`` replaces the config)
            time.sleep(period / SLICE_TICKS if cpu_bound else period)
            self.engines.increment_epoch()

    # ===== the loop =====

    def _loop(self) -> None:
        pin_current_thread(self.placement.runtime_cores)
        guests, dispatch = self.guests, self.dispatch
        cohorts, cpu_share, limits = guests.cohorts, guests.cpu_share, InstanceLimits(guests)
        next_check = 0.0
        while not self._stop:
            t0 = time.perf_counter()
            self.stats.turns += 1
            # Clear before looking at any state: a wake-up posted from now on is not lost.
            # (Most turns find it clear; ``clear`` itself runs three Python functions.)
            if self._wake.is_set():
                self._wake.clear()
            self._process_inbox()  # (``advance_queues`` below answers any poke)
            if self.microserving.reservations:
                self.microserving.expire(time.monotonic())
            cohort_s = cohorts.release_stalled() if cohorts.starting else None
            if t0 >= next_check:  # the memory budget; once a second, the idle limit
                limits.check(t0)
                next_check = t0 + 0.1
            dispatch.drain_engine()
            if self.worker.failure is not None:
                self.supervisor.check()  # it died: fail what it held, start another
            dispatch.advance_queues()
            wait_s = dispatch.maybe_fire(before_guests=True)
            ran = guests.run_guests(dispatch.after_turns())
            guests.end_pending()
            if ran and not dispatch.batch_inflight:
                # What the guests just submitted rides the batch the engine is free for.
                dispatch.advance_queues()
                wait_s = dispatch.maybe_fire()
            if ran and dispatch.batch_inflight:
                dispatch.maybe_fire_ahead()
            if ran:
                self.stats.loop_s += time.perf_counter() - t0
            if not guests.runq and not self._inbox and not dispatch.poked:
                if wait_s is None and not dispatch.batch_inflight:
                    dispatch.idle_since = None  # nothing to run: idle for want of work
                if guests.to_close and guests.to_close.free_one():
                    continue  # (step 7: one store freed; more left)
                timeout = min(0.05 if wait_s is None else max(0.0, wait_s), cpu_share.wait_s())
                if cohort_s is not None:
                    timeout = min(timeout, cohort_s)
                self._wake.wait(timeout)
        guests.end_all("the runtime stopped")

    def _process_inbox(self) -> None:
        guests = self.guests
        while self._inbox:
            item = self._inbox.popleft()
            if isinstance(item, Launch):
                guests.spawn(item.handle, item.program, item.args)
            elif isinstance(item, LaunchBatch):
                guests.spawn_cohort(item.handles, item.program, item.args)
            elif isinstance(item, Deliver):
                inst = guests.instances.get(item.instance_id)
                if inst is not None:
                    overflow = self.messaging.deliver_from_client(inst, item.message)
                    if overflow:
                        guests.kill(inst, overflow)
            elif isinstance(item, Kill):
                inst = guests.instances.get(item.instance_id)
                if inst is not None:
                    guests.kill(inst, item.reason)
            elif isinstance(item, Call):
                item.fn()
            elif isinstance(item, StartCompletion):
                completions.start_completion(self, self.prefix_cache, item.handle_id, item.request)

    def _on_cohort_release(self) -> None:
        self.dispatch.poke()  # its held work is ready: a turn more to fire it

    # ===== the runtime as its parts see it (``RuntimeServices``; runtime thread) =====
    # (The calls host functions make on every pass — ``caller``, ``enqueue``, ``waker``,
    # ``submit_op`` — are bound in ``_bind_parts`` straight to the part that does them:
    # host code runs with cold caches, where each delegating frame costs ~1 µs.)

    def _bind_parts(self) -> None:
        guests, dispatch, eager = self.guests, self.dispatch, self.eager
        self.caller: Callable[[int], Instance] = guests.caller
        self.next_seq: Callable[[], int] = guests.next_seq
        self.register_instance: Callable[[Instance], None] = guests.register
        self.end_instance: Callable[[Instance, bool, str | None], None] = guests.end
        self.kill: Callable[[Instance, str], None] = guests.kill
        self.launch_child: Callable[..., InstanceHandle | str] = guests.launch_child
        self.waker: Callable[[Instance], Callable[[], None]] = guests.waker
        self.enqueue: Callable[[CommandQueue, Any], None] = dispatch.enqueue
        self.submit_op: Callable[[Any, Callable[[Any], None]], None] = dispatch.submit_op
        self.track_op: Callable[[Any], None] = dispatch.track_op
        self.allocate_pages: Callable[..., list[int] | None] = eager.allocate_pages

    def new_queue(self, inst: Instance) -> CommandQueue:
        q = CommandQueue(owner=inst.seq)
        if inst.cohort is not None:
            inst.cohort.hold(q)
        inst.queues.append(q)
        self.batcher.add_queue(q)
        return q


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

    def new_worker() -> EngineWorker:
        return start_worker(
            engine_config,
            mode=worker_mode,
            on_ready=wake.set,
            threads=engine_threads,
            placement=placement,
            idle_spin_s=engine_idle_spin_s,
        )

    rt = Runtime(new_worker(), config, cache_dir=cache_dir, wake=wake, placement=placement,
                 restart_worker=new_worker)  # fmt: skip
    return rt.start()
