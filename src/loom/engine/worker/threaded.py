"""The in-process worker: the engine in a background thread of this process."""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from loom.config import EngineConfig
from loom.engine.worker.base import _WorkerBase
from loom.engine.worker.executor import _OpRunner, _startup_error
from loom.engine.worker.ops import WorkerOp

logger = logging.getLogger(__name__)

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
