"""The ``loom serve`` under test: started as a subprocess, its engine worker found (and
killed) through ``/proc``, its state read from ``/health``, ``/metrics`` and ``/proc``."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``loom serve`` on 127.0.0.1 with its engine worker in a child process."""

    def __init__(self, model: str, api_key: str, extra: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.args = [
            "--model",
            model,
            "--port",
            str(self.port),
            "--worker",
            "process",
            "--api-key",
            api_key,
            *extra,
        ]
        fd, log = tempfile.mkstemp(prefix="loom-soak-server-", suffix=".log")
        os.close(fd)
        self.log = Path(log)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 300.0) -> None:
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "loom", "serve", *self.args],
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the server did not start: {self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def worker_pid(self) -> int | None:
        """The engine worker: the server's child started by multiprocessing's spawn (the
        other child, the resource tracker, is not it)."""
        for child in children(self.pid):
            if "spawn_main" in cmdline(child):
                return child
        return None

    def kill_worker(self) -> int:
        pid = self.worker_pid()
        if pid is None:
            raise RuntimeError("no engine worker process found under the server")
        os.kill(pid, signal.SIGKILL)
        return pid

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"}


def children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                out += [
                    int(x) for x in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
                ]
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def proc_stats(pid: int | None) -> dict[str, float | None]:
    """RSS (MB), threads and open file descriptors of ``pid`` (None where unreadable)."""
    out: dict[str, float | None] = {"rss_mb": None, "threads": None, "fds": None}
    if pid is None:
        return out
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss_mb"] = int(line.split()[1]) / 1024
            elif line.startswith("Threads:"):
                out["threads"] = int(line.split()[1])
    with contextlib.suppress(OSError):
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def parse_metrics(text: str) -> dict[str, float]:
    """The unlabelled samples of a Prometheus text page."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or "{" in line:
            continue
        name, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[name] = float(value)
    return out


async def snapshot(http: httpx.AsyncClient, server: Server) -> dict[str, Any]:
    """What the leak checks and the time series read: /health, /metrics, /proc."""
    snap: dict[str, Any] = {"t": time.monotonic()}
    try:
        r = await http.get(server.url + "/health", timeout=10)
        snap["health_ms"] = 1000 * (time.monotonic() - snap["t"])
        h = r.json()
        snap.update(
            status=h.get("status"),
            instances=h.get("instances"),
            engine_restarts=h.get("engine_restarts"),
            health_code=r.status_code,
        )
    except (httpx.HTTPError, ValueError) as e:
        snap["health_error"] = repr(e)
    try:
        r = await http.get(server.url + "/metrics", headers=server.headers, timeout=10)
        m = parse_metrics(r.text)
        used, cached = m.get("loom_kv_pages_used"), m.get("loom_kv_pages_cached")
        snap.update(
            pages_used=used,
            pages_cached=cached,
            pages_free=m.get("loom_kv_pages_free"),
            pages_held=None if used is None or cached is None else used - cached,
            instances_running=m.get("loom_instances_running"),
            completions_running=m.get("loom_completions_running"),
            commands_queued=m.get("loom_commands_queued"),
            generated_tokens=m.get("loom_generated_tokens_total"),
            engine_tokens=m.get("loom_engine_tokens_total"),
            spawned=m.get("loom_instances_spawned_total"),
        )
    except httpx.HTTPError as e:
        snap["metrics_error"] = repr(e)
    snap["server"] = proc_stats(server.pid)
    worker = server.worker_pid()
    snap["worker_pid"] = worker
    snap["worker"] = proc_stats(worker)
    return snap
