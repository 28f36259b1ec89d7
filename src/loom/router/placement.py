"""Where a router's engines come from: ``Placement`` starts, adds, removes and finds them.
``LocalPlacement`` runs them as processes on this machine; ``RayPlacement``
(``router/ray_placement.py``) as actors on a Ray cluster."""

from __future__ import annotations

import time
from typing import Any, Protocol

from loom.router.engines import EngineProcess, cpu_sets, spawn_engine, start_engines, wait_ready


class Placement(Protocol):
    def start(self, n: int) -> list[str]:
        """Start ``n`` engines and wait until each serves: their URLs."""
        ...

    def add(self) -> str:
        """One more engine, serving: its URL."""
        ...

    def remove(self, url: str) -> None:
        """Stop the engine at ``url``."""
        ...

    def locate(self, url: str) -> str | None:
        """The URL the engine once at ``url`` serves at now (it may have been restarted
        elsewhere); ``None``: it does not serve."""
        ...

    def describe(self, url: str) -> dict[str, Any]:
        """What is known of the engine at ``url`` (where it runs)."""
        ...

    def owns(self, url: str) -> bool:
        """Whether it started the engine serving at ``url``."""
        ...

    def close(self) -> None:
        """Stop every engine it started."""
        ...


class LocalPlacement:
    """``loom engine`` processes on 127.0.0.1, each pinned to its own cores. One that
    exits is started again on the same cores when the router looks for it (``locate``),
    up to ``max_restarts`` times in all, as Ray restarts an engine's actor."""

    def __init__(self, model: str, extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None, quiet: bool = False,
                 max_restarts: int = 3) -> None:  # fmt: skip
        self.model, self.args, self.env, self.quiet = model, extra_args, env, quiet
        self.procs: dict[str, EngineProcess] = {}
        self.restarts_left = max_restarts

    def start(self, n: int) -> list[str]:
        procs = start_engines(n, self.model, self.args, quiet=self.quiet, env=self.env)
        self.procs.update((p.url, p) for p in procs)
        return [p.url for p in procs]

    def add(self) -> str:
        # Its cores: the next share as if one more engine had been started with the rest.
        n = len(self.procs) + 1
        return self._start(cpu_sets(n)[n - 1])

    def remove(self, url: str) -> None:
        p = self.procs.pop(url, None)
        if p is None:
            raise ValueError(f"no engine {url} was started here")
        p.stop()

    def locate(self, url: str) -> str | None:
        p = self.procs.get(url)
        if p is None:
            return None
        if p.proc.poll() is None:
            return url
        if self.restarts_left <= 0:
            return None
        self.restarts_left -= 1
        del self.procs[url]
        try:
            return self._start(p.cpus)
        except RuntimeError:
            return None

    def _start(self, cpus: list[int]) -> str:
        p = spawn_engine(self.model, cpus, self.args, quiet=self.quiet, env=self.env)
        try:
            wait_ready(p, time.monotonic() + 300)
        except BaseException:
            p.stop()
            raise
        self.procs[p.url] = p
        return p.url

    def owns(self, url: str) -> bool:
        return url in self.procs

    def describe(self, url: str) -> dict[str, Any]:
        p = self.procs.get(url)
        return {} if p is None else {"cpus": p.cpus, "engine_pid": p.proc.pid}

    def close(self) -> None:
        for p in self.procs.values():
            p.stop()
        self.procs.clear()
