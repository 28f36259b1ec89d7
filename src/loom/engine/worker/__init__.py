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

from collections.abc import Callable
from typing import Literal

from loom.config import EngineConfig
from loom.engine.worker.cpu_placement import UNPINNED, CpuPlacement
from loom.engine.worker.ops import (
    IDLE_SPIN_S,
    ChunkStep,
    CopySlotsOp,
    EngineStatsSnapshot,
    EngineWorker,
    ExecuteOp,
    GenPlan,
    KVRecvStartOp,
    KVReleaseOp,
    KVReserveOp,
    KVSendCachedOp,
    KVSendSpec,
    KVStatusOp,
    KVTransferResult,
    NudgeOp,
    RemoteTraceback,
    ResetPagesOp,
    SamplingStateOp,
    SetLiveOp,
    WorkerInfo,
    WorkerOp,
)
from loom.engine.worker.process import SubprocessWorker
from loom.engine.worker.threaded import InProcessWorker


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


__all__ = [
    "IDLE_SPIN_S",
    "ChunkStep",
    "CopySlotsOp",
    "EngineStatsSnapshot",
    "EngineWorker",
    "ExecuteOp",
    "GenPlan",
    "InProcessWorker",
    "KVRecvStartOp",
    "KVReleaseOp",
    "KVReserveOp",
    "KVSendCachedOp",
    "KVSendSpec",
    "KVStatusOp",
    "KVTransferResult",
    "NudgeOp",
    "RemoteTraceback",
    "ResetPagesOp",
    "SamplingStateOp",
    "SetLiveOp",
    "SubprocessWorker",
    "WorkerInfo",
    "WorkerOp",
    "start_worker",
]
