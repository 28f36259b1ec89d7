"""The worker contract: the ops a runtime submits, what comes back, and the
``EngineWorker`` protocol both workers implement."""

from __future__ import annotations

import dataclasses
import logging
import pickle
from dataclasses import dataclass
from typing import Protocol

from loom.engine.batch import ForwardBatch, OutputResult, SamplerSpec
from loom.engine.sampling_state import StateSpec

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
    secret: str | None = None  # the KV channel's shared secret, for a receiver that asks
    progress_s: float = 10.0  # a transfer that moves no byte this long fails


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
    """Start the KV receiver (once; later calls return the same address): ``"host:port"``.
    With a ``secret``, it takes frames only from senders proving they hold it."""

    secret: str | None = None
    port: int = 0  # 0: any free port
    progress_s: float = 10.0  # a frame whose bytes stop this long closes its connection
    host: str = "127.0.0.1"  # the address it binds (and others reach it at)


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

    @property
    def failure(self) -> str | None:
        """Why the worker can run nothing more (it died), or None."""
        ...

    @property
    def closed(self) -> bool:
        """``close`` was called."""
        ...


class RemoteTraceback(Exception):
    """Set as ``__cause__`` of an exception raised in the child, to show where it came from."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'
