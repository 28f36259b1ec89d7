"""The bookkeeping both workers share: op ids, results, draining, failure."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

from loom.engine.worker.ops import ChunkStep, EngineStatsSnapshot, WorkerInfo, WorkerOp
from loom.errors import LoomError

logger = logging.getLogger(__name__)

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

    @property
    def failure(self) -> str | None:
        """Why the worker can run nothing more (read without the lock: set once)."""
        return self._failure

    @property
    def closed(self) -> bool:
        return self._closed

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
