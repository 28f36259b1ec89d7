"""Supervision of the engine worker: its death is noticed, reported and repaired.

A worker process can die (killed, out of memory, a crash in a kernel). Its ops then fail
with ``LoomError("engine worker died ...")`` (``engine.worker.base``). The supervisor,
asked once per loop turn, sees the worker's failure and: ends every instance and
completion with an error saying so (their KV lived in the dead process), forgets every
KV page (prefix cache, exports, reservations), and starts a new worker, up to
``max_restarts`` times within ``window_s``; past that the runtime stays failed and says
why (``status``). While the new worker loads, the loop waits (requests queue up).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from loom.engine.worker import EngineWorker

_log = logging.getLogger(__name__)


class WorkerSupervisor:
    """Watches ``rt.worker`` and replaces it when it dies (runtime thread only)."""

    def __init__(
        self,
        rt: Any,  # the Runtime (its parts are reset here; typed loosely: no import cycle)
        restart: Callable[[], EngineWorker] | None,
        max_restarts: int = 3,
        window_s: float = 600.0,
    ) -> None:
        self.rt = rt
        self._restart = restart
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.restarts: list[float] = []  # monotonic times of restarts
        self.failure: str | None = None  # why the runtime cannot serve (None: it can)
        self.restarting = False

    @property
    def status(self) -> str:
        """``ok``, ``restarting the engine worker``, or why the runtime cannot serve (for
        ``/health``; read from any thread)."""
        if self.failure is not None:
            return self.failure
        return "restarting the engine worker" if self.restarting else "ok"

    def check(self) -> None:
        """Repair the worker if it died (cheap when it did not: one attribute read)."""
        worker = self.rt.worker
        reason = worker.failure
        if reason is None or self.failure is not None or worker.closed:
            return
        _log.error("%s", reason)
        self._fail_everything(f"{reason}; the request was lost with it")
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < self.window_s]
        if self._restart is None:
            self.failure = f"{reason} (no restart configured)"
            return
        if len(self.restarts) >= self.max_restarts:
            self.failure = (f"{reason}; not restarted: {len(self.restarts)} restarts in the "
                            f"last {self.window_s:g} s")  # fmt: skip
            return
        self.restarts.append(now)
        self.restarting = True
        try:
            new = self._restart()
        except Exception as e:  # the model no longer loads, say
            self.failure = f"{reason}; the restart failed: {e}"
            return
        finally:
            self.restarting = False
        old, self.rt.worker = worker, new
        self.rt.dispatch.worker = new
        _log.warning("engine worker restarted (%d in the last %g s)", len(self.restarts),
                     self.window_s)  # fmt: skip
        old.close()

    def _fail_everything(self, why: str) -> None:
        rt = self.rt
        rt.dispatch.drain_engine()  # the failed ops resolve their futures first
        rt.guests.end_all(why)
        rt.guests.end_pending()
        rt.microserving.reservations.clear()
        for name in list(rt.exports.exports):
            rt.exports.remove(name)
        rt.prefix_cache.clear()
        rt.dispatch.reset()
