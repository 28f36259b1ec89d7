"""Local engine processes for ``loom router --engines N``: each a ``loom engine`` on its
own port, pinned to its own cores, ready when its ``/health`` answers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
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
    engines: list[EngineProcess] = []
    for cpus in cpu_sets(n):
        port = free_port()
        cmd = [sys.executable, "-m", "loom", "engine", "--model", model, "--port", str(port)]
        if cpus:
            cmd += ["--cpus", ",".join(map(str, cpus))]
        cmd += extra_args or []
        out = subprocess.DEVNULL if quiet else None
        proc = subprocess.Popen(cmd, stdout=out, stderr=out, env={**os.environ, **(env or {})})
        engines.append(EngineProcess(f"http://127.0.0.1:{port}", cpus, proc))
    deadline = time.monotonic() + timeout_s
    try:
        for e in engines:
            while True:
                if e.proc.poll() is not None:
                    raise RuntimeError(f"engine {e.url} exited with {e.proc.returncode}")
                try:
                    if httpx.get(e.url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"engine {e.url} did not start in {timeout_s:g} s")
                time.sleep(0.2)
    except BaseException:
        for e in engines:
            e.stop()
        raise
    return engines
