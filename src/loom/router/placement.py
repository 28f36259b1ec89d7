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

    def close(self) -> None:
        """Stop every engine it started."""
        ...


class LocalPlacement:
    """``loom engine`` processes on 127.0.0.1, each pinned to its own cores."""

    def __init__(self, model: str, extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None, quiet: bool = False) -> None:  # fmt: skip
        self.model, self.args, self.env, self.quiet = model, extra_args, env, quiet
        self.procs: dict[str, EngineProcess] = {}

    def start(self, n: int) -> list[str]:
        procs = start_engines(n, self.model, self.args, quiet=self.quiet, env=self.env)
        self.procs.update((p.url, p) for p in procs)
        return [p.url for p in procs]

    def add(self) -> str:
        # Its cores: the next share as if one more engine had been started with the rest.
        n = len(self.procs) + 1
        p = spawn_engine(self.model, cpu_sets(n)[n - 1], self.args, quiet=self.quiet,
                         env=self.env)  # fmt: skip
        try:
            wait_ready(p, time.monotonic() + 300)
        except BaseException:
            p.stop()
            raise
        self.procs[p.url] = p
        return p.url

    def remove(self, url: str) -> None:
        p = self.procs.pop(url, None)
        if p is None:
            raise ValueError(f"no engine {url} was started here")
        p.stop()

    def locate(self, url: str) -> str | None:
        p = self.procs.get(url)
        return url if p is not None and p.proc.poll() is None else None

    def describe(self, url: str) -> dict[str, Any]:
        p = self.procs.get(url)
        return {} if p is None else {"cpus": p.cpus, "engine_pid": p.proc.pid}

    def close(self) -> None:
        for p in self.procs.values():
            p.stop()
        self.procs.clear()
