"""Local engine processes for ``loom router --engines N``: each a ``loom engine`` on its
own port, pinned to its own cores, ready when its ``/health`` answers. The same pieces
start the engine inside each Ray actor (``router/ray_placement.py``)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import httpx


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class EngineProcess:
    url: str
    cpus: list[int]
    proc: subprocess.Popen[bytes]

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def cpu_sets(n: int) -> list[list[int]]:
    """Split the cores this process may use into ``n`` disjoint sets (round-robin when
    there are fewer cores than engines)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not cores:
        return [[] for _ in range(n)]
    if len(cores) < n:
        return [[cores[i % len(cores)]] for i in range(n)]
    per = len(cores) // n
    return [cores[i * per : (i + 1) * per] for i in range(n)]


def spawn_engine(
    model: str,
    cpus: list[int],
    extra_args: list[str] | None = None,
    host: str = "127.0.0.1",
    quiet: bool = False,
    env: dict[str, str] | None = None,
) -> EngineProcess:
    """Start one ``loom engine`` on a free port of ``host`` (not yet waited for)."""
    port = free_port(host)
    cmd = [sys.executable, "-m", "loom", "engine", "--model", model, "--host", host,
           "--port", str(port)]  # fmt: skip
    if cpus:
        cmd += ["--cpus", ",".join(map(str, cpus))]
    cmd += extra_args or []
    out = subprocess.DEVNULL if quiet else None
    proc = subprocess.Popen(cmd, stdout=out, stderr=out, env={**os.environ, **(env or {})})
    return EngineProcess(f"http://{host}:{port}", cpus, proc)


def wait_ready(engine: EngineProcess, deadline: float) -> None:
    """Until ``engine`` answers ``/health`` (or exits, or ``deadline`` passes: errors)."""
    while True:
        if engine.proc.poll() is not None:
            raise RuntimeError(f"engine {engine.url} exited with {engine.proc.returncode}")
        try:
            if httpx.get(engine.url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"engine {engine.url} did not start in time")
        time.sleep(0.2)


def start_engines(
    n: int,
    model: str = "tiny",
    extra_args: list[str] | None = None,
    timeout_s: float = 300.0,
    quiet: bool = False,
    env: dict[str, str] | None = None,
) -> list[EngineProcess]:
    """Start ``n`` engines on 127.0.0.1 and wait until each serves; stops them all if any
    fails to come up. ``env`` is added to their environment (secrets go there: a command
    line is readable by every local user)."""
    engines = [spawn_engine(model, cpus, extra_args, quiet=quiet, env=env) for cpus in cpu_sets(n)]
    deadline = time.monotonic() + timeout_s
    try:
        for e in engines:
            wait_ready(e, deadline)
    except BaseException:
        for e in engines:
            e.stop()
        raise
    return engines


def exit_with_parent(poll_s: float = 0.2) -> None:
    """End this process the moment its parent is gone (an engine whose Ray actor was
    killed must not serve on unseen): a thread watches for the process being adopted."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGKILL)  # no graceful drain: nobody owns it now

    threading.Thread(target=watch, name="loom-parent-watch", daemon=True).start()
