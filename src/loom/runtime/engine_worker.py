"""The engine worker: runs one ``Engine``'s tensors (model + KV cache) for the inferlet runtime.

The runtime thread decides everything about KV pages (it owns a ``PagePool`` built from
``WorkerInfo``); the worker never allocates. It only executes ops, strictly in submission
order, and hands each op's result back, exceptions included, through a non-blocking
``drain()``. ``on_ready`` tells the runtime when there is something to drain.

Two implementations of the ``EngineWorker`` protocol:

- ``InProcessWorker``: a background thread of this process. No serialisation at all, but
  it shares the GIL with the runtime.
- ``SubprocessWorker``: a child process started with the "spawn" context (torch and
  ``fork`` do not mix). Ops go over one one-way pipe, results come back over another, as
  pickles; only token ids and results cross, so no shared memory is needed. The child has
  its own GIL, and its death (a crash, an OOM kill) becomes a ``LoomError`` per op instead
  of taking the runtime down.

torch is imported only where the engine runs: a runtime using the subprocess worker never
imports it.
"""

from __future__ import annotations

import contextlib
import copyreg
import dataclasses
import functools
import io
import itertools
import logging
import multiprocessing
import operator
import os
import pickle
import queue
import signal
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from loom.config import EngineConfig
from loom.engine.batch import ForwardBatch, OutputResult, OutputSpec, SamplerSpec
from loom.engine.grammar import GrammarError
from loom.engine.sampling_state import StateSpec
from loom.errors import LoomError, ModelLoadError, RequestError
from loom.models import resolve_model_dir
from loom.runtime.cpu_placement import UNPINNED, CpuPlacement, pin_current_thread
from loom.runtime.pipe_reader import FRAME_LENGTH, SpinningPipeReader

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from loom.engine.engine import Engine

logger = logging.getLogger(__name__)

# Both ends pickle with the same interpreter and package; protocol 5 is the fastest.
_PICKLE = pickle.HIGHEST_PROTOCOL
# How long close() lets the child finish its queued ops before terminating it.
_CLOSE_TIMEOUT_S = 10.0
# How long a process worker with cores of its own polls for its next op after each one:
# longer than the runtime's turn between batches at up to ~10 instances (0.1-1 ms on the
# 2-core test machine), short enough that an idle server's engine core goes quiet at once.
IDLE_SPIN_S = 0.002


# ===== the contract =====


@dataclass(frozen=True)
class WorkerInfo:
    """What the runtime needs to know about the loaded engine (sent once, at startup)."""

    model_dir: str
    num_pages: int  # the runtime builds its PagePool(num_pages, page_size) from these
    page_size: int
    vocab_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    prefix_caching: bool = True  # EngineConfig.enable_prefix_caching: the runtime's cache on


@dataclass
class GenPlan:
    """How the worker may go on generating one sequence of a batch by itself.

    After the batch's step the sequence has ``kv_len`` slots written and its sampled
    token (``batch.outputs[output]``) pending at ``position``. Each continued step feeds
    that token, samples the next with ``sampler`` (its seed offset by the token count, as
    the runtime's generation does) and stops at a token of ``stop_tokens`` or after
    ``max_steps`` steps. ``pages`` (physical, in order) must hold every slot written."""

    output: int
    pages: list[int]
    kv_len: int
    position: int
    sampler: SamplerSpec
    seed_count: int  # tokens generated before the first continued step's sample
    stop_tokens: frozenset[int]
    max_steps: int
    logit_mask: list[int] | None
    logit_bias: tuple[tuple[int, ...], tuple[float, ...]] | None = None
    state: int | None = None  # the generation's sampling state (penalties, grammar)


@dataclass
class ChunkStep:
    """Progress of an ``ExecuteOp`` with plans, drained like a result but before it (the
    op stays pending): step 0 carries the batch's own ``results``; step k > 0 the token
    each plan sampled in its k-th continued step (None: that plan had stopped). The
    final result still carries everything, so a reader may ignore these."""

    step: int
    results: list[OutputResult] | None
    tokens: list[int | None] | None


@dataclass
class KVSendSpec:
    """Send the K/V of ``local_slots`` (every layer, as each layer is computed) into
    ``remote_slots`` of the engine whose KV receiver listens at ``dst``."""

    rid: str
    dst: str
    local_slots: list[int]
    remote_slots: list[int]
    transport: str = "tcp"  # "tcp", or "shm" for a receiver on this host


@dataclass
class KVTransferResult:
    """How one send went (bytes, time writing frames, time not hidden behind compute)."""

    rid: str
    ok: bool
    error: str | None
    bytes: int
    send_s: float
    exposed_s: float


@dataclass
class ExecuteOp:
    """Clear the slot state of ``fresh_pages``, then run ``batch``; the result is
    ``list[OutputResult]`` in the order of ``batch.outputs``. With ``plans``, the worker
    then continues those generations on its own (no round trip per token) and the result
    is ``(results, tokens)``: the tokens each plan produced after the batch's step."""

    batch: ForwardBatch
    fresh_pages: list[int]
    plans: list[GenPlan] = dataclasses.field(default_factory=list)
    # With sends, the result is ``(result, list[KVTransferResult])``: each send's K/V go
    # out layer by layer during the step, and the step returns once receivers answered.
    kv_sends: list[KVSendSpec] = dataclasses.field(default_factory=list)
    # Passes ahead sent before the batch they follow has returned: (index into
    # ``batch.token_ids``, index into the previous ``ExecuteOp``'s results) — each such
    # input is the token that output sampled. The worker fills them in, so the step runs
    # without a round trip to the runtime; if that batch failed, this one fails too.
    chain: list[tuple[int, int]] = dataclasses.field(default_factory=list)


@dataclass
class SamplingStateOp:
    """End the engine's sampling states ``end``, then start ``start``. Ops run in
    order, so a state started before a batch naming it is live for it."""

    start: list[StateSpec] = dataclasses.field(default_factory=list)
    end: list[int] = dataclasses.field(default_factory=list)


@dataclass
class CopySlotsOp:
    """Copy ``size`` slots (KV, positions, liveness) between pages; the result is ``None``."""

    src_page: int
    dst_page: int
    src_offset: int
    dst_offset: int
    size: int


@dataclass
class SetLiveOp:
    """Set the liveness of every slot of ``page`` (one flag per slot); the result is ``None``."""

    page: int
    live: list[bool]


@dataclass
class ResetPagesOp:
    """Mark every slot of ``pages`` unwritten; the result is ``None``."""

    pages: list[int]


@dataclass
class NudgeOp:
    """Does nothing; its arrival ends a running generation chunk early, so work that came
    in meanwhile does not wait for the whole chunk. The result is ``None``."""


@dataclass
class KVRecvStartOp:
    """Start the KV receiver (once; later calls return the same address): ``"host:port"``."""


@dataclass
class KVReserveOp:
    """Clear ``fresh_pages``, then accept K/V for ``slots`` (at ``positions``) under
    ``rid``; the result is ``None``."""

    rid: str
    slots: list[int]
    positions: list[int]
    fresh_pages: list[int]


@dataclass
class KVReleaseOp:
    """Stop accepting K/V for ``rid`` (consumed or expired); the result is ``None``."""

    rid: str


@dataclass
class KVStatusOp:
    """The receiver's view of ``rid``: ``{complete, bytes, error, expected}`` or ``None``."""

    rid: str


@dataclass
class KVSendCachedOp:
    """Send K/V that are already in the cache (no step runs); ``list[KVTransferResult]``."""

    sends: list[KVSendSpec]


WorkerOp = (
    ExecuteOp | CopySlotsOp | SetLiveOp | ResetPagesOp | KVRecvStartOp | KVReserveOp
    | KVReleaseOp | KVStatusOp | KVSendCachedOp | NudgeOp | SamplingStateOp
)  # fmt: skip


@dataclass(frozen=True)
class EngineStatsSnapshot:
    """A copy of the engine's counters, taken after every op submitted before the request."""

    num_steps: int
    num_tokens: int
    num_outputs: int
    recent_batches: list[tuple[int, int]]  # (sequences, tokens) per batch, newest last
    busy_s: float = 0.0  # wall time inside passes


class EngineWorker(Protocol):
    """Runs engine ops in submission order, off the caller's thread."""

    info: WorkerInfo
    # perf_counter time the latest result (not progress) was made drainable: when the
    # engine went free, which may be well before the runtime drains it.
    last_arrival: float

    def submit(self, op: WorkerOp) -> int:
        """Queue ``op``; return its id (increasing). Never waits for the engine."""
        ...

    def drain(self) -> list[tuple[int, object | BaseException]]:
        """Take the finished ops as ``(op id, result or the exception it raised)``, in
        completion order (an op with plans first yields ``ChunkStep`` progress, one per
        step). Never blocks. Ops run in submission order, so their results come
        in that order; an op that never reaches the engine (unpicklable, or the worker is
        closed or dead) resolves at once, possibly ahead of earlier ops still running."""
        ...

    def stats(self) -> EngineStatsSnapshot:
        """Engine counters once every op submitted so far has run (waits for them)."""
        ...

    def close(self) -> None:
        """Stop the worker after the ops already submitted; idempotent. Later ops resolve
        to ``LoomError``."""
        ...


def start_worker(
    config: EngineConfig,
    *,
    mode: Literal["process", "thread"] = "process",
    on_ready: Callable[[], None] | None = None,
    threads: int | None = None,
    placement: CpuPlacement = UNPINNED,
    idle_spin_s: float | None = None,
) -> EngineWorker:
    """Load the engine described by ``config`` in a child process or a background thread.

    Returns once the engine is loaded; a failure to load raises ``ModelLoadError`` here.
    ``on_ready`` is called from a worker-owned thread each time results become available
    to ``drain()``; keep it short (setting a ``threading.Event`` is the intended use), and
    never call ``stats()`` from it: that thread is the one that would deliver the answer.
    ``threads`` sets the child's torch intra-op threads (process mode; None: torch's default).
    ``placement`` (process mode): the child runs on its ``engine`` cores, the reader thread
    that takes its results on the ``runtime`` core.
    ``idle_spin_s`` (process mode): how long the child polls its ops pipe after each op
    instead of sleeping (``SubprocessWorker``).
    """
    if mode == "process":
        return SubprocessWorker(
            config, on_ready, threads=threads, placement=placement, idle_spin_s=idle_spin_s
        )
    if mode == "thread":
        return InProcessWorker(config, on_ready)
    raise ValueError(f"mode must be 'process' or 'thread', got {mode!r}")


class RemoteTraceback(Exception):
    """Set as ``__cause__`` of an exception raised in the child, to show where it came from."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


# ===== running ops against an engine (in whichever thread or process owns it) =====


class _OpRunner:
    """Owns the engine; executes one op per call. Used by both workers."""

    def __init__(self, config: EngineConfig) -> None:
        # Resolve first: a bad model directory fails before torch is even imported.
        model_dir = resolve_model_dir(config.model)
        from loom.engine.engine import Engine

        self.engine: Engine = Engine(config)
        engine = self.engine
        self.num_pages, self.page_size = engine.pool.num_pages, engine.pool.page_size
        self.vocab_size = engine.model_config.vocab_size
        self.senders: dict[str, Any] = {}  # KV transports by kind, made on first use
        # Whether an op waits behind the current one (set by the worker that owns this
        # runner): a generation chunk ends early for it.
        self.pending: Callable[[], bool] = lambda: False
        # Hands each step of a generation chunk to the runtime as it is made (set by the
        # worker that owns this runner), so tokens stream out in the pass that made them.
        self.progress: Callable[[ChunkStep], None] = lambda step: None
        self.receiver: Any = None
        self.last_results: list[OutputResult] | None = None  # of the last ExecuteOp
        # The same EOS set the engine's own output processor uses (tokenizer's, then the
        # model config's), keeping order for the runtime's benefit.
        eos = tuple(engine.tokenizer.eos_token_ids) + tuple(engine.model_config.eos_token_ids)
        self.info = WorkerInfo(
            model_dir=str(model_dir),
            num_pages=self.num_pages,
            page_size=self.page_size,
            vocab_size=self.vocab_size,
            max_model_len=engine.max_model_len,
            eos_token_ids=tuple(dict.fromkeys(eos)),
            prefix_caching=config.enable_prefix_caching,
        )

    def _continue(self, results: list[OutputResult], plans: list[GenPlan]) -> list[list[int]]:
        """Decode steps of the planned sequences, batched, until each stops."""
        ps = self.page_size
        last: list[int | None] = [results[p.output].token for p in plans]
        out: list[list[int]] = [[] for _ in plans]
        active = [i for i, p in enumerate(plans) if p.max_steps > 0
                  and last[i] is not None and last[i] not in p.stop_tokens]  # fmt: skip
        while active:
            toks, pos, tables, lasts, outs = [], [], [], [], []
            for j, i in enumerate(active):
                p, k = plans[i], len(out[i])
                written = p.kv_len + k + 1  # slots after this step
                s = p.sampler
                if s.seed is not None:  # the same per-token seed the runtime would use
                    s = SamplerSpec(s.temperature, s.top_k, s.top_p, s.min_p,
                                    (s.seed + p.seed_count + k) & 0xFFFFFFFFFFFFFFFF)  # fmt: skip
                toks.append(int(last[i]))  # type: ignore[arg-type]
                pos.append(p.position + k)
                tables.append(p.pages[: -(-written // ps)])
                lasts.append(written - ps * (len(tables[-1]) - 1))
                outs.append(OutputSpec(j, s, 0, None, p.logit_mask, p.logit_bias, p.state))
            batch = ForwardBatch(toks, pos, list(range(len(active) + 1)), tables, lasts, outs)
            step = self.engine.execute(batch)
            still = []
            made: list[int | None] = [None] * len(plans)
            for j, i in enumerate(active):
                tok = step[j].token
                assert tok is not None
                out[i].append(tok)
                last[i] = tok
                made[i] = tok
                p = plans[i]
                room = (len(p.pages) * ps) - (p.kv_len + len(out[i]) + 1)
                if tok not in p.stop_tokens and len(out[i]) < p.max_steps and room >= 0:
                    still.append(i)
            self.progress(ChunkStep(len(out[active[0]]), None, made))
            active = still
            if active and self.pending():
                break  # new work is waiting: hand back what was made, the runtime goes on
        return out

    def run(self, op: WorkerOp) -> object:
        """Execute one op; raise ``RequestError`` for anything wrong with its arguments."""
        cache = self.engine.runner.cache
        if isinstance(op, ExecuteOp):
            last, self.last_results = self.last_results, None  # a failure leaves None
            if op.chain:
                self._fill_chain(op, last)
            self._check_pages(op.fresh_pages)
            # Reset before validating: the runtime allocated these pages for this batch,
            # and whether or not the batch runs, a previous owner's slots must never be
            # visible through them.
            cache.reset_pages(list(op.fresh_pages))
            try:
                op.batch.validate(self.num_pages, self.page_size, self.vocab_size)
            except ValueError as e:
                # ``validate`` raises plain ValueError for structural problems; at this
                # boundary they are the caller's fault, which is what RequestError says.
                raise _request_error(e, "invalid forward batch") from e
            if op.kv_sends:
                return self._execute_sending(op)
            return self._execute(op)
        if isinstance(op, CopySlotsOp):
            self._check_pages([op.src_page, op.dst_page])
            if op.size < 0:
                raise RequestError(f"copy size must be >= 0, got {op.size}")
            try:
                cache.copy_slots(op.src_page, op.dst_page, op.src_offset, op.dst_offset, op.size)
            except ValueError as e:
                raise _request_error(e, "copy_slots") from e
            return None
        if isinstance(op, SetLiveOp):
            self._check_pages([op.page])
            try:
                cache.set_live(op.page, list(op.live))
            except ValueError as e:
                raise _request_error(e, "set_live") from e
            return None
        if isinstance(op, ResetPagesOp):
            self._check_pages(op.pages)
            cache.reset_pages(list(op.pages))
            return None
        if isinstance(op, NudgeOp):
            return None
        if isinstance(op, SamplingStateOp):
            states = self.engine.states
            for sid in op.end:
                states.end(sid)
            for state in op.start:
                try:
                    states.start(state)
                except GrammarError as e:
                    raise RequestError(f"grammar: {e}") from e
            return None
        if isinstance(op, KVRecvStartOp):
            return self._receiver().address
        if isinstance(op, KVReserveOp):
            self._check_pages(op.fresh_pages)
            cache.reset_pages(list(op.fresh_pages))
            self._check_slots(op.slots)
            self._receiver().reserve(op.rid, list(op.slots), list(op.positions))
            return None
        if isinstance(op, KVReleaseOp):
            if self.receiver is not None:
                self.receiver.release(op.rid)
            return None
        if isinstance(op, KVStatusOp):
            return self.receiver.status(op.rid) if self.receiver is not None else None
        if isinstance(op, KVSendCachedOp):
            for spec in op.sends:
                self._check_slots(spec.local_slots)
            for layer in range(cache.kv.shape[0]):
                self._send_layer(op.sends, layer)
            return self._flush_sends(op.sends)
        raise TypeError(f"not a worker op: {type(op).__name__}")

    def _fill_chain(self, op: ExecuteOp, last: list[OutputResult] | None) -> None:
        if last is None:
            raise RequestError("the batch these passes follow failed or did not run")
        tokens = op.batch.token_ids
        for i, j in op.chain:
            if not (0 <= i < len(tokens) and 0 <= j < len(last)):
                raise RequestError(f"chained input {i} <- output {j} is out of range")
            tok = last[j].token
            if tok is None:
                raise RequestError(f"output {j} of the previous batch sampled no token")
            tokens[i] = tok

    def _execute(self, op: ExecuteOp) -> object:
        # ``execute`` validates again (a few microseconds): the engine's only public
        # entry, so its checks stay in one place.
        results = self.engine.execute(op.batch)
        # Generations continued past the step leave its tokens behind: nothing chains on.
        self.last_results = None if op.plans else results
        if not op.plans:
            return results
        for plan in op.plans:
            self._check_pages(plan.pages)
        self.progress(ChunkStep(0, results, None))
        return results, self._continue(results, op.plans)

    def _execute_sending(self, op: ExecuteOp) -> object:
        for spec in op.kv_sends:
            self._check_slots(spec.local_slots)
        runner = self.engine.runner
        runner.layer_hook = lambda layer: self._send_layer(op.kv_sends, layer)
        try:
            result = self._execute(op)
        finally:
            runner.layer_hook = None
        return result, self._flush_sends(op.kv_sends)

    def _send_layer(self, sends: list[KVSendSpec], layer: int) -> None:
        import torch

        kv = self.engine.runner.cache.kv[layer]  # [2, slots, kv_heads, head_dim]
        for spec in sends:
            idx = torch.tensor(spec.local_slots, dtype=torch.long, device=kv.device)
            # A copy: the sender thread writes it out while the next layer computes.
            self._sender(spec.transport).put(spec.dst, spec.rid, spec.remote_slots, layer,
                               kv.index_select(1, idx))  # fmt: skip

    def _flush_sends(self, sends: list[KVSendSpec]) -> list[KVTransferResult]:
        out = []
        for transport in sorted({s.transport for s in sends}):
            group = {s.rid: s.dst for s in sends if s.transport == transport}
            stats = self._sender(transport).flush(group)
            out += [
                KVTransferResult(rid, st.error is None, st.error, st.bytes, st.send_s, st.exposed_s)
                for rid, st in stats.items()
            ]
        return out

    def _sender(self, transport: str = "tcp") -> Any:
        from loom.engine.kv_transfer import KVSender

        sender = self.senders.get(transport)
        if sender is None:
            sender = self.senders[transport] = KVSender(mode=transport)
        return sender

    def _receiver(self) -> Any:
        if self.receiver is None:
            from loom.engine.kv_transfer import KVReceiver

            cache = self.engine.runner.cache

            def on_complete(slots: list[int], positions: list[int]) -> None:
                import torch

                idx = torch.tensor(slots, dtype=torch.long, device=cache.slot_pos.device)
                cache.slot_pos[idx] = torch.tensor(positions, dtype=torch.long,
                                                   device=cache.slot_pos.device)  # fmt: skip
                cache.slot_live[idx] = True
                cache.version += 1

            self.receiver = KVReceiver(cache.kv, on_complete)
        return self.receiver

    def _check_slots(self, slots: list[int]) -> None:
        n = self.num_pages * self.page_size
        if any(not (isinstance(s, int) and 0 <= s < n) for s in slots):
            raise RequestError(f"slot ids out of range [0, {n})")

    def _check_pages(self, pages: list[int]) -> None:
        # Out-of-range ids would index past the KV tensors (an IndexError, or a silent
        # no-op for slices), so name them here.
        bad = [p for p in pages if not (isinstance(p, int) and 0 <= p < self.num_pages)]
        if bad:
            raise RequestError(f"page ids out of range [0, {self.num_pages}): {bad[:8]}")

    def stats(self) -> EngineStatsSnapshot:
        s = self.engine.stats
        return EngineStatsSnapshot(
            num_steps=s.num_steps,
            num_tokens=s.num_tokens,
            num_outputs=s.num_outputs,
            recent_batches=list(s.recent_batches),
            busy_s=s.busy_s,
        )


def _request_error(e: ValueError, what: str) -> RequestError:
    return e if isinstance(e, RequestError) else RequestError(f"{what}: {e}")


def _startup_error(e: BaseException) -> ModelLoadError:
    """What ``start_worker`` raises for an engine that failed to load."""
    if isinstance(e, ModelLoadError):
        return e
    err = ModelLoadError(f"engine worker failed to start: {type(e).__name__}: {e}")
    err.__cause__ = e
    return err


# ===== the bookkeeping both workers share =====


class _WorkerBase:
    """Op ids, pending ops, finished results, stats waiters, and failure of the worker.

    Two locks: ``_send_lock`` orders ids with transmission (an op with a smaller id is
    always sent first, and writes to the transport never interleave); ``_lock`` guards the
    tables below and is never held while calling out (transport, ``on_ready``).
    """

    info: WorkerInfo

    def __init__(self, on_ready: Callable[[], None] | None) -> None:
        self._on_ready = on_ready
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._op_ids = itertools.count(1)
        self._stats_ids = itertools.count(1)
        self._closed = False  # close() was called (guarded by _send_lock)
        # Guarded by _lock:
        self._pending: dict[int, None] = {}  # submitted, unresolved op ids (ordered set)
        self._done: list[tuple[int, object | BaseException]] = []
        self._stats_waiters: dict[int, Future[EngineStatsSnapshot]] = {}
        self._failure: str | None = None  # once set, nothing more runs; the reason why
        self.last_arrival = 0.0

    # --- the EngineWorker interface ---

    def submit(self, op: WorkerOp) -> int:
        with self._send_lock:
            op_id = next(self._op_ids)
            with self._lock:
                failure = "engine worker is closed" if self._closed else self._failure
                if failure is None:
                    self._pending[op_id] = None
            error = self._transmit_op(op_id, op) if failure is None else LoomError(failure)
        if error is not None:
            # The op could not be sent (unpicklable) or the worker can run nothing more:
            # it resolves at once, so on_ready is called from the submitting thread here,
            # outside the locks (it may well submit again).
            with self._lock:
                self._pending.pop(op_id, None)
                self._done.append((op_id, error))
            self._notify()
        return op_id

    def drain(self) -> list[tuple[int, object | BaseException]]:
        with self._lock:
            done, self._done = self._done, []
        return done

    def stats(self) -> EngineStatsSnapshot:
        fut: Future[EngineStatsSnapshot] = Future()
        with self._send_lock:
            with self._lock:
                failure = "engine worker is closed" if self._closed else self._failure
                if failure is None:
                    req_id = next(self._stats_ids)
                    self._stats_waiters[req_id] = fut
            if failure is not None:
                raise LoomError(failure)
            # Queued behind every op submitted so far, so the snapshot includes them.
            self._transmit_stats(req_id)
        return fut.result()

    def __enter__(self) -> _WorkerBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError

    # --- for the implementations ---

    def _transmit_op(self, op_id: int, op: WorkerOp) -> BaseException | None:
        """Hand ``op`` to the engine; return an exception that is the op's result at once."""
        raise NotImplementedError

    def _transmit_stats(self, req_id: int) -> None:
        raise NotImplementedError

    def _complete(self, results: list[tuple[int, object | BaseException]]) -> None:
        """Make finished ops drainable and tell the runtime."""
        with self._lock:
            for op_id, result in results:
                if op_id in self._pending:  # else already failed by _fail
                    if not isinstance(result, ChunkStep):  # progress: still running
                        del self._pending[op_id]
                        self.last_arrival = time.perf_counter()
                    self._done.append((op_id, result))
        if results:
            self._notify()

    def _progress(self, op_id: int, step: ChunkStep) -> None:
        self._complete([(op_id, step)])

    def _stats_reply(self, req_id: int, snapshot: EngineStatsSnapshot) -> None:
        with self._lock:
            fut = self._stats_waiters.pop(req_id, None)
        if fut is not None:
            fut.set_result(snapshot)

    def _fail(self, reason: str) -> None:
        """The worker can run nothing more: every pending op (and every later one) and
        every stats request resolves to ``LoomError(reason)``. The first reason sticks."""
        with self._lock:
            if self._failure is None:
                self._failure = reason
            reason = self._failure
            failed = list(self._pending)
            self._pending.clear()
            # A fresh exception per op: raising one instance in several places would
            # tangle their tracebacks.
            self._done.extend((op_id, LoomError(reason)) for op_id in failed)
            waiters = list(self._stats_waiters.values())
            self._stats_waiters.clear()
        for fut in waiters:
            fut.set_exception(LoomError(reason))
        if failed:
            self._notify()

    def _notify(self) -> None:
        if self._on_ready is None:
            return
        try:
            self._on_ready()
        except Exception:
            # The callback belongs to the runtime; its bug must not stop result delivery.
            logger.exception("engine worker on_ready callback raised")


# ===== in-process: a background thread =====


@dataclass
class _ThreadOp:
    op_id: int
    op: WorkerOp


@dataclass
class _ThreadStats:
    req_id: int


class InProcessWorker(_WorkerBase):
    """Runs the engine in a daemon thread of this process."""

    def __init__(self, config: EngineConfig, on_ready: Callable[[], None] | None = None) -> None:
        super().__init__(on_ready)
        self._inbox: queue.SimpleQueue[_ThreadOp | _ThreadStats | None] = queue.SimpleQueue()
        self._runner: _OpRunner | None = None
        self._start_error: BaseException | None = None
        started = threading.Event()
        self._thread = threading.Thread(
            target=self._main, args=(config, started), name="loom-engine-worker", daemon=True
        )
        self._thread.start()
        started.wait()
        if self._runner is None:
            self._thread.join()
            assert self._start_error is not None
            raise _startup_error(self._start_error)
        self.info = self._runner.info

    def _main(self, config: EngineConfig, started: threading.Event) -> None:
        # The engine is built on this thread too, so every op and the load see the same
        # thread-local torch state.
        try:
            runner = _OpRunner(config)
        except BaseException as e:
            self._start_error = e
            started.set()
            return
        self._runner = runner
        runner.pending = lambda: not self._inbox.empty()
        started.set()
        reason = "engine worker is closed"
        try:
            while (item := self._inbox.get()) is not None:
                if isinstance(item, _ThreadStats):
                    self._stats_reply(item.req_id, runner.stats())
                    continue
                runner.progress = functools.partial(self._progress, item.op_id)
                try:
                    result: object = runner.run(item.op)
                except Exception as e:
                    result = e
                self._complete([(item.op_id, result)])
        except BaseException as e:
            reason = f"engine worker died: {type(e).__name__}: {e}"
            raise
        finally:
            self._fail(reason)

    def _transmit_op(self, op_id: int, op: WorkerOp) -> BaseException | None:
        self._inbox.put(_ThreadOp(op_id, op))
        return None

    def _transmit_stats(self, req_id: int) -> None:
        self._inbox.put(_ThreadStats(req_id))

    def close(self) -> None:
        with self._send_lock:
            if self._closed:
                return
            self._closed = True
            self._inbox.put(None)  # after every op already queued
        if threading.current_thread() is not self._thread:  # close() from on_ready
            self._thread.join()


# ===== in a child process =====

# Parent -> child: a header (kind byte, id) and the payload; an op travels as its own
# pickle, so an op the child cannot unpickle still fails as that op instead of losing its
# id. (A pickled ``(kind, id, payload)`` tuple cost a second pickling and a copy per op.)
_OP, _STATS, _CLOSE = b"o", b"s", b"c"
_EXECUTE = b"x"  # an ExecuteOp without plans or sends, in the compact form below
_HEADER = struct.Struct("<cQ")
# Messages under this size are framed here (``FRAME_LENGTH``) and written in one call.
_SMALL_MESSAGE = 1 << 16


@dataclass
class _Ready:
    info: WorkerInfo


@dataclass
class _StartupFailed:
    error: BaseException
    tb: str


@dataclass
class _OpDone:
    op_id: int
    result: object
    tb: str | None  # the child's traceback when ``result`` is an exception


@dataclass
class _StatsReply:
    req_id: int
    snapshot: EngineStatsSnapshot


class SubprocessWorker(_WorkerBase):
    """Runs the engine in a "spawn" child process; a reader thread here collects results.

    ``idle_spin_s``: after each op, while it waits for the next, the child polls its ops
    pipe for this long instead of sleeping, so that sending it a batch does not pay for
    waking it (``pipe_reader``). By default ``IDLE_SPIN_S`` when ``placement`` gives the
    engine cores of its own, else 0: a polling child on a core the runtime thread uses
    would take that thread's time.
    """

    def __init__(
        self,
        config: EngineConfig,
        on_ready: Callable[[], None] | None = None,
        *,
        threads: int | None = None,
        placement: CpuPlacement = UNPINNED,
        idle_spin_s: float | None = None,
    ) -> None:
        super().__init__(on_ready)
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if idle_spin_s is None:
            idle_spin_s = IDLE_SPIN_S if placement.engine else 0.0
        if idle_spin_s < 0:
            raise ValueError(f"idle_spin_s must be >= 0, got {idle_spin_s}")
        self.idle_spin_s = idle_spin_s
        ctx = multiprocessing.get_context("spawn")
        ops_r, ops_w = ctx.Pipe(duplex=False)
        res_r, res_w = ctx.Pipe(duplex=False)
        # daemon: if the runtime exits without close(), multiprocessing still ends the child.
        self._process = ctx.Process(
            target=_child_main,
            args=(config, ops_r, res_w, threads, placement.engine, idle_spin_s),
            name="loom-engine-worker",
            daemon=True,
        )
        self._process.start()
        # Process.join/is_alive from two threads at once can lose the exit status (both
        # call waitpid); the reader thread and close() take this lock around them.
        self._proc_lock = threading.Lock()
        # Drop our copies of the child's ends: then EOF on ``res_r`` means the child is gone,
        # and the child sees EOF on ``ops_r`` if this process dies.
        ops_r.close()
        res_w.close()
        self._ops_w, self._res_r = ops_w, res_r
        self._ops_fd = ops_w.fileno()
        self._pickler = _WirePickler()  # used under the send lock
        try:
            self.info = self._await_ready()
        except BaseException:
            self._stop_process(timeout=2.0)  # a failed child is exiting on its own
            ops_w.close()
            res_r.close()
            raise
        self._reader = threading.Thread(
            target=self._read_results,
            args=(placement.runtime_cores,),
            name="loom-engine-worker-reader",
            daemon=True,
        )
        self._reader.start()

    @property
    def pid(self) -> int | None:
        """The child's process id."""
        return self._process.pid

    def _await_ready(self) -> WorkerInfo:
        try:
            msg = self._res_r.recv()
        except (EOFError, OSError):
            self._process.join(timeout=5.0)
            raise ModelLoadError(
                f"engine worker exited during startup ({_describe_exit(self._process.exitcode)})"
            ) from None
        if isinstance(msg, _StartupFailed):
            msg.error.__cause__ = RemoteTraceback(msg.tb)
            raise _startup_error(msg.error)
        assert isinstance(msg, _Ready), f"unexpected startup message {type(msg).__name__}"
        return msg.info

    def _transmit_op(self, op_id: int, op: WorkerOp) -> BaseException | None:
        try:
            if isinstance(op, ExecuteOp) and not op.plans and not op.kv_sends:
                kind, payload = _EXECUTE, _encode_execute(op)
            else:
                kind, payload = _OP, self._pickler.dumps(op)
        except Exception as e:
            return e  # nothing was sent: the op fails on its own, the worker carries on
        self._send(kind, op_id, payload)
        return None

    def _transmit_stats(self, req_id: int) -> None:
        self._send(_STATS, req_id, b"")

    def _send(self, kind: bytes, ident: int, payload: bytes) -> None:
        # OSError: the child is gone. The reader thread sees the results pipe close and
        # fails every pending op and stats request, this one included. (Not
        # ``contextlib.suppress``: three Python calls per op on the runtime thread.)
        try:  # noqa: SIM105
            _write_message(self._ops_w, self._ops_fd, kind, ident, payload)
        except OSError:
            pass

    def _read_results(self, cores: frozenset[int] | None) -> None:
        """Reader thread: results -> ``_done`` (then ``on_ready``) until the child exits.
        ``cores``: where it runs (the runtime thread's core, which takes the results next)."""
        pin_current_thread(cores)
        reason: str | None = None
        try:
            while True:
                try:
                    msgs = [self._res_r.recv()]
                    # Everything already waiting goes out under one on_ready call.
                    while self._res_r.poll():
                        msgs.append(self._res_r.recv())
                except (EOFError, OSError):
                    break
                results: list[tuple[int, object | BaseException]] = []
                for msg in msgs:
                    if isinstance(msg, _OpDone):
                        if msg.tb is not None and isinstance(msg.result, BaseException):
                            msg.result.__cause__ = RemoteTraceback(msg.tb)
                        results.append((msg.op_id, msg.result))
                    elif isinstance(msg, _StatsReply):
                        self._stats_reply(msg.req_id, msg.snapshot)
                self._complete(results)
        except BaseException as e:
            # A message we cannot read: the protocol is broken, so stop the child rather
            # than leave ops hanging.
            reason = f"engine worker died: unreadable message ({type(e).__name__}: {e})"
            with self._proc_lock:
                self._process.kill()
            raise
        finally:
            if reason is None:
                with self._proc_lock:
                    self._process.join(timeout=5.0)
                if self._closed:
                    reason = "engine worker is closed"
                else:
                    reason = f"engine worker died ({_describe_exit(self._process.exitcode)})"
            self._fail(reason)

    def close(self) -> None:
        with self._send_lock:
            if self._closed:
                return
            self._closed = True
            # The child runs the ops already sent, then exits (OSError: it is already dead).
            with contextlib.suppress(OSError):
                self._ops_w.send_bytes(_HEADER.pack(_CLOSE, 0))
        self._stop_process(timeout=_CLOSE_TIMEOUT_S)
        if threading.current_thread() is not self._reader:  # close() from on_ready
            self._reader.join()
        self._ops_w.close()
        self._fail("engine worker is closed")  # no-op unless the reader failed to

    def _stop_process(self, timeout: float) -> None:
        with self._proc_lock:
            self._process.join(timeout)
            if self._process.is_alive():
                self._process.terminate()
                self._process.join(2.0)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()


def _write_message(conn: Connection, fd: int, kind: bytes, ident: int, payload: bytes) -> None:
    """Write what ``conn.send_bytes(header + payload)`` writes (``fd`` is its descriptor).

    A small message (a decode step's op) is framed here and written with one system
    call: ``send_bytes`` runs five Python functions per op on the runtime thread."""
    if len(payload) >= _SMALL_MESSAGE:
        conn.send_bytes(_HEADER.pack(kind, ident) + payload)
        return
    msg = FRAME_LENGTH.pack(_HEADER.size + len(payload)) + _HEADER.pack(kind, ident) + payload
    sent = os.write(fd, msg)
    while sent < len(msg):  # a blocking pipe takes it all, barring signals
        sent += os.write(fd, msg[sent:])


def _positional_reducer(cls: type) -> Callable[[Any], tuple[type, tuple[Any, ...]]]:
    """Pickle a dataclass instance as ``cls(*fields)``.

    The default for slots dataclasses goes through their Python ``__getstate__`` /
    ``__setstate__`` (field by field, ``object.__setattr__`` for frozen ones): for a
    32-sequence decode op that is ~3x slower than one constructor call per object.
    """
    fields = [f.name for f in dataclasses.fields(cls)]
    assert len(fields) > 1 and all(f.init for f in dataclasses.fields(cls))
    get = operator.attrgetter(*fields)  # several names: returns the tuple, in C
    return lambda obj: (cls, get(obj))


_WIRE_REDUCERS: dict[type, Callable[[Any], Any]] = {
    **copyreg.dispatch_table,
    **{
        cls: _positional_reducer(cls)
        for cls in (
            ForwardBatch,
            OutputSpec,
            SamplerSpec,
            OutputResult,
            ExecuteOp,
            GenPlan,
            ChunkStep,
        )
    },
}


def _dumps(obj: object) -> bytes:
    """Pickle what crosses the pipes (plain ``pickle.loads`` reads it back)."""
    return _WirePickler().dumps(obj)


class _WirePickler:
    """``_dumps`` with one pickler kept for a sender's every message (a new pickler and
    buffer per op showed up in the per-step cost of a single decode step). Not
    thread-safe: one per sender, used under its send lock."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._pickler = pickle.Pickler(self._buf, protocol=_PICKLE)
        self._pickler.dispatch_table = _WIRE_REDUCERS

    def dumps(self, obj: object) -> bytes:
        buf = self._buf
        buf.seek(0)
        buf.truncate()
        self._pickler.clear_memo()  # each message stands alone
        self._pickler.dump(obj)
        return buf.getvalue()


# Every field of ``OutputSpec``, in order (``test_the_wire_keeps_every_output_field``).
_OUTPUT_FIELDS = operator.attrgetter(
    "index", "sampler", "top_k_dist", "logprobs", "logit_mask", "logit_bias", "state"
)
_SAMPLER_FIELDS = operator.attrgetter("temperature", "top_k", "top_p", "min_p", "seed")


def _encode_execute(op: ExecuteOp) -> bytes:
    """A decode step's op as plain tuples and lists, pickled by C alone: the dataclass
    reducers cost a Python call per object, ~4x the time for a one-sequence op, and this
    is paid on the runtime thread for every batch."""
    b = op.batch
    outputs = [(i, None if s is None else _SAMPLER_FIELDS(s), k, lp, mask, bias, state)
               for i, s, k, lp, mask, bias, state in map(_OUTPUT_FIELDS, b.outputs)]  # fmt: skip
    wire = (b.token_ids, b.positions, b.seq_indptr, b.page_tables, b.last_page_lens, outputs,
            b.masks, op.fresh_pages, op.chain)  # fmt: skip
    return pickle.dumps(wire, protocol=_PICKLE)


def _decode_execute(payload: bytes | memoryview) -> ExecuteOp:
    """The ``ExecuteOp`` that ``_encode_execute`` wrote (in the worker)."""
    tokens, positions, indptr, tables, lasts, wire_outputs, masks, fresh, chain = pickle.loads(
        payload
    )
    samplers: dict[tuple[Any, ...], SamplerSpec] = {}
    outputs = []
    for i, s, k, lp, mask, bias, state in wire_outputs:
        sampler = None
        if s is not None:
            sampler = samplers.get(s)
            if sampler is None:
                sampler = samplers[s] = SamplerSpec(*s)
        outputs.append(OutputSpec(i, sampler, k, lp, mask, bias, state))
    batch = ForwardBatch(tokens, positions, indptr, tables, lasts, outputs, masks)
    return ExecuteOp(batch, fresh, [], [], chain)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _portable(e: BaseException) -> BaseException:
    """``e`` if it survives a pickle round trip, else a ``LoomError`` carrying its text.

    Checked in the child, so the parent's reader never meets an exception it cannot
    rebuild (e.g. a class whose ``__init__`` takes other arguments than ``args``).
    """
    try:
        pickle.loads(_dumps(e))
    except Exception:
        return LoomError(f"{type(e).__name__}: {e}")
    return e


def _child_main(
    config: EngineConfig,
    ops_r: Connection,
    res_w: Connection,
    threads: int | None = None,
    cores: frozenset[int] | None = None,
    idle_spin_s: float = 0.0,
) -> None:
    """The child process: load the engine, then serve ops until told to stop. ``cores``:
    where it runs (set first, so that torch's threads start there)."""
    pin_current_thread(cores)
    # Ctrl-C reaches the whole process group; the parent decides when the worker stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # tqdm's default lock (the loader's progress bar) is a multiprocessing lock, whose
    # semaphore the ``os._exit`` below would leave for the resource tracker to warn about.
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    try:
        try:
            runner = _OpRunner(config)
        except BaseException as e:
            res_w.send_bytes(_dumps(_StartupFailed(_portable(e), traceback.format_exc())))
        else:
            res_w.send_bytes(_dumps(_Ready(runner.info)))
            _serve(runner, ops_r, res_w, idle_spin_s)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the parent is gone: nobody to answer
    # Skip the interpreter's teardown: tearing torch down takes ~0.7 s, which close()
    # would wait for, and the child holds nothing that needs finalizing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _send_progress(res_w: Connection, replies: _WirePickler, op_id: int, step: ChunkStep) -> None:
    res_w.send_bytes(replies.dumps(_OpDone(op_id, step, None)))


def _serve(runner: _OpRunner, ops_r: Connection, res_w: Connection, idle_spin_s: float) -> None:
    """Run ops and answer stats requests in arrival order until a close message (or EOF).

    A reader thread moves messages from the pipe into a queue as they come, so the pipe
    never fills while a long op runs and the parent's ``submit`` never waits on the engine.
    While this thread waits for work, the reader polls for ``idle_spin_s`` first.
    """
    inbox: queue.SimpleQueue[tuple[bytes, int, memoryview]] = queue.SimpleQueue()

    def deliver(data: bytes | None) -> None:
        if data is None:  # the parent is gone (or closed its end)
            inbox.put((_CLOSE, 0, memoryview(b"")))
            return
        kind, ident = _HEADER.unpack_from(data)
        inbox.put((kind, ident, memoryview(data)[_HEADER.size :]))

    reader = SpinningPipeReader(ops_r.fileno(), deliver, idle_spin_s)
    threading.Thread(target=reader.run, name="loom-engine-worker-ops", daemon=True).start()
    runner.pending = lambda: not inbox.empty()
    replies = _WirePickler()
    while True:
        if inbox.empty():
            reader.idle()
        kind, ident, payload = inbox.get()
        if kind == _CLOSE:
            return
        if kind == _STATS:
            res_w.send_bytes(replies.dumps(_StatsReply(ident, runner.stats())))
            continue
        tb: str | None = None
        runner.progress = functools.partial(_send_progress, res_w, replies, ident)
        try:
            op = _decode_execute(payload) if kind == _EXECUTE else pickle.loads(payload)
            result: object = runner.run(op)
        except Exception as e:
            result, tb = _portable(e), traceback.format_exc()
        try:
            reply = replies.dumps(_OpDone(ident, result, tb))
        except Exception as e:  # a result that cannot cross (it never should): its error
            reply = _dumps(_OpDone(ident, _portable(e), traceback.format_exc()))
        res_w.send_bytes(reply)
