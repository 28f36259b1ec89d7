"""Engines joining and leaving a running router: added or removed on request
(``/admin/engines``), followed when their placement restarts them at a new address, and
optionally scaled by queue length.

The scaling policy is deliberately simple: one engine more while the requests in flight
per live engine stay above ``scale_queue`` (up to ``max_engines``); one fewer (never
below the engines it started with) after ``idle_checks`` checks in a row found nothing in
flight. Off unless ``max_engines`` exceeds the starting count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import httpx

from loom.router.fleet import Engine, probe
from loom.router.placement import Placement
from loom.router.router import Router

log = logging.getLogger("loom.router")


def scale_decision(running: list[int], n_min: int, n_max: int, per_engine: float,
                   idle_checks: int, idle_needed: int) -> int:  # fmt: skip
    """+1 (add an engine), -1 (remove one) or 0, from the requests in flight on each live
    engine and how many checks in a row found none at all."""
    n = len(running)
    if n and n < n_max and sum(running) / n > per_engine:
        return 1
    if n > n_min and idle_checks >= idle_needed:
        return -1
    return 0


class EngineManager:
    """Changes ``router.engines`` at run time; ``placement``: where new engines come from
    (``None``: only engines started elsewhere can be added, by URL)."""

    def __init__(
        self,
        router: Router,
        placement: Placement | None = None,
        max_engines: int = 0,
        scale_queue: float = 4.0,
        idle_needed: int = 15,
    ) -> None:
        self.router, self.placement = router, placement
        self.min_engines = len(router.engines)
        self.max_engines, self.scale_queue, self.idle_needed = max_engines, scale_queue, idle_needed
        self.idle_checks = 0
        self.scaled = {"up": 0, "down": 0}
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def placed(self, url: str) -> bool:
        """Whether the placement started the engine at ``url`` (and so may stop it)."""
        return self.placement is not None and self.placement.owns(url)

    async def add(self, url: str | None = None) -> Engine:
        """Route to the engine at ``url`` (it must answer ``/health``), or to a new engine
        from the placement."""
        async with self._lock:
            if url is None:
                if self.placement is None:
                    raise ValueError("this router cannot start engines: give an engine 'url'")
                url = await asyncio.to_thread(self.placement.add)
            else:
                try:
                    resp = await self.router.http.get(url.rstrip("/") + "/health", timeout=5)
                    ok = resp.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if not ok:
                    raise ValueError(f"engine {url} does not answer /health")
            engine = self.router.add_engine(url)
            log.warning("loom: engine %s joined (%d engines)", url, len(self.router.engines))
            return engine

    async def remove(self, url: str, drain_s: float = 60.0) -> None:
        """Stop routing to the engine at ``url`` once its requests finish; stop it too if
        the placement started it."""
        engine = next((e for e in self.router.engines if e.url == url.rstrip("/")), None)
        if engine is None:
            raise KeyError(url)
        await self.router.remove_engine(engine, drain_s)
        if self.placed(engine.url):
            assert self.placement is not None
            await asyncio.to_thread(self.placement.remove, engine.url)
        log.warning("loom: engine %s left (%d engines)", url, len(self.router.engines))

    async def follow(self) -> None:
        """Engines found down: ask the placement where each serves now (Ray restarts a
        dead engine's actor, and the new engine has a new port) and route there."""
        if self.placement is None:
            return
        for e in [e for e in self.router.engines if not e.healthy and not e.retiring]:
            new = await asyncio.to_thread(self.placement.locate, e.url)
            if new is None or new == e.url:
                continue
            log.warning("loom: engine %s was restarted at %s", e.url, new)
            e.url = new
            e.forget()  # a new process: new KV receiver, knows no peers
            await probe(self.router.http, [e])

    async def autoscale(self) -> None:
        """One check of the scaling policy (and at most one engine added or removed)."""
        if self.max_engines <= self.min_engines or self.placement is None:
            return
        live = self.router.live_engines()
        running = [e.running for e in live]
        self.idle_checks = self.idle_checks + 1 if not any(running) else 0
        step = scale_decision(running, self.min_engines, self.max_engines, self.scale_queue,
                              self.idle_checks, self.idle_needed)  # fmt: skip
        if step > 0:
            await self.add()
            self.scaled["up"] += 1
        elif step < 0:
            newest = max((e for e in live if self.placed(e.url)), key=lambda e: e.index,
                         default=None)  # fmt: skip
            if newest is not None:
                self.idle_checks = 0
                await self.remove(newest.url)
                self.scaled["down"] += 1

    def start(self, interval_s: float) -> None:
        """Follow restarted engines and apply the scaling policy every ``interval_s``."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(interval_s)
                try:
                    await self.follow()
                    await self.autoscale()
                except Exception as e:  # a failed step is tried again next time
                    log.warning("loom: managing engines failed: %s", e)

        if interval_s > 0 and self._task is None:
            self._task = asyncio.create_task(loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def describe(self) -> dict[str, Any]:
        engines = []
        for e in self.router.engines:
            where = self.placement.describe(e.url) if self.placement is not None else {}
            engines.append({"url": e.url, "index": e.index, "alive": e.alive,
                            "running": e.running, "served": e.served, "error": e.error,
                            "retiring": e.retiring, "placed": self.placed(e.url),
                            **where})  # fmt: skip
        return {"engines": engines, "autoscale": {
            "min": self.min_engines, "max": self.max_engines, "queue": self.scale_queue,
            **self.scaled}}  # fmt: skip
