"""``loom router --ray`` on a real Ray cluster on 127.0.0.1 (head node started with
``ray start``, no dashboard): engines as actors, the same answers as a local router,
an actor killed mid-request, engines added and removed, nothing left after shutdown."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.router.conftest import free_port

# Ray replaces 127.0.0.1 by the machine's routable address unless told it is no cluster
# of several machines: with this, every Ray daemon and engine binds loopback only.
# Ray's token authentication on, with a token of the test's own (not whatever a
# ~/.ray/auth_token of this user's says): the cluster and the router get it from here.
RAY_ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}  # fmt: skip
PROMPTS = [list(range(10 + i, 60 + 3 * i)) for i in range(4)]


def ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def processes_mentioning(text: str) -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and d.name != str(os.getpid()):
            try:
                cmdline = d.joinpath("cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if text in cmdline and running(int(d.name)):
                found.append(int(d.name))
    return found


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[dict[str, str]]:
    temp = tempfile.mkdtemp(prefix="lr", dir="/tmp")  # short: Ray's socket paths are long
    port = free_port()
    cmd = [ray_bin(), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
           "--include-dashboard=false", "--num-cpus=3", "--disable-usage-stats",
           f"--temp-dir={temp}"]  # fmt: skip
    subprocess.run(cmd, env=RAY_ENV, check=True, capture_output=True, timeout=120)
    yield {"address": f"127.0.0.1:{port}", "temp": temp}
    subprocess.run([ray_bin(), "stop", "--force"], env=RAY_ENV, capture_output=True, timeout=120)
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_router(ray_cluster: dict[str, str], tiny_dir: Path) -> Iterator[dict[str, Any]]:
    port = free_port()
    cmd = [sys.executable, "-m", "loom", "router", "--ray", ray_cluster["address"],
           "--engines", "2", "--strategy", "dp", "--model", str(tiny_dir), "--port", str(port),
           "--health-interval-s", "0.5"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=RAY_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log: list[str] = []
    assert proc.stderr is not None
    threading.Thread(target=lambda: log.extend(ln.decode() for ln in proc.stderr),  # type: ignore[union-attr]
                     daemon=True).start()  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:
        assert proc.poll() is None, "the router exited:\n" + "".join(log)
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the router did not start:\n" + "".join(log)
        time.sleep(0.3)
    yield {"url": url, "proc": proc, "log": log}
    if proc.poll() is None:
        proc.terminate()
        proc.wait(60)


def complete(url: str, prompt: list[int], max_tokens: int = 12, model: str = "tiny") -> str:
    r = httpx.post(url + "/v1/completions", timeout=120, json={
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True})  # fmt: skip
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["text"])


def switch(url: str, strategy: str) -> None:
    r = httpx.post(url + "/admin/strategy", json={"strategy": strategy}, timeout=10)
    assert r.status_code == 200, r.text


def engines_of(url: str) -> list[dict[str, Any]]:
    return list(httpx.get(url + "/admin/engines", timeout=10).json()["engines"])


@pytest.mark.parametrize("strategy", ["dp", "pd"])
def test_ray_engines_answer_as_a_local_router(
    ray_router: dict[str, Any], router_url: str, strategy: str
) -> None:
    url = ray_router["url"]
    engines = engines_of(url)
    assert len(engines) == 2 and all(e["alive"] and e["node_ip"] == "127.0.0.1" for e in engines)
    assert sorted(c for e in engines for c in e["cpus"]) == [0, 1]  # one core each
    switch(url, strategy)
    switch(router_url, strategy)
    for prompt in PROMPTS:
        assert complete(url, prompt) == complete(router_url, prompt)
    if strategy == "pd":  # the prefill engine sent KV to a decode engine
        metrics = httpx.get(url + "/metrics", timeout=10).text
        sent = [float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith("loom_router_kv_sent_bytes_total")]  # fmt: skip
        assert sum(sent) > 0


def test_killed_actor_mid_request_completes_elsewhere(
    ray_router: dict[str, Any], router_url: str
) -> None:
    url = ray_router["url"]
    switch(url, "dp")
    prompt = PROMPTS[0]
    want = complete(router_url, prompt, max_tokens=600)
    text, killed = [], None
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 600, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            text += [c.get("text") or "" for c in chunk["choices"]]
            if killed is None:  # the first text came: kill the actor serving it
                busy = [e for e in engines_of(url) if e["running"]]
                assert len(busy) == 1
                killed = busy[0]
                os.kill(killed["actor_pid"], signal.SIGKILL)
    assert killed is not None
    assert "".join(text) == want  # the other engine finished it, the client saw no seam
    metrics = httpx.get(url + "/metrics", timeout=10).text
    assert "loom_router_retries_total 0" not in metrics
    # The engine died with its actor, Ray restarted the actor, the router follows it.
    deadline = time.monotonic() + 120
    while running(killed["engine_pid"]):
        assert time.monotonic() < deadline, "the killed actor's engine still runs"
        time.sleep(0.2)
    while True:
        now = engines_of(url)
        back = [e for e in now if e["index"] == killed["index"]]
        if back and back[0]["alive"] and back[0]["actor_pid"] != killed["actor_pid"]:
            break
        assert time.monotonic() < deadline, f"the engine did not come back: {now}"
        time.sleep(0.5)
    model = httpx.get(back[0]["url"] + "/v1/models", timeout=10).json()["data"][0]["id"]
    assert complete(back[0]["url"], prompt, model=model) == complete(router_url, prompt)


def test_added_and_removed_engines_take_and_stop_traffic(ray_router: dict[str, Any]) -> None:
    url = ray_router["url"]
    switch(url, "dp")
    r = httpx.post(url + "/admin/engines", json={}, timeout=300)
    assert r.status_code == 200, r.text
    (added,) = r.json()["added"]
    assert len(engines_of(url)) == 3

    def burst() -> None:  # 9 at once: least-loaded spreads them over all three
        threads = [threading.Thread(target=complete, args=(url, p, 24))
                   for p in PROMPTS * 2 + PROMPTS[:1]]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    burst()
    new = next(e for e in engines_of(url) if e["url"] == added)
    assert new["served"] > 0, "the added engine took no request"
    r = httpx.delete(url + "/admin/engines", params={"url": added}, timeout=120)
    assert r.status_code == 200, r.text
    left = engines_of(url)
    assert added not in [e["url"] for e in left] and len(left) == 2
    assert not running(new["engine_pid"]) and not running(new["actor_pid"])
    served = {e["url"]: e["served"] for e in left}
    burst()
    assert sum(e["served"] for e in engines_of(url)) == sum(served.values()) + 9
    missing = httpx.delete(url + "/admin/engines", params={"url": added}, timeout=10)
    assert missing.status_code == 404


def test_no_process_left_after_shutdown(
    ray_router: dict[str, Any], ray_cluster: dict[str, str]
) -> None:
    pids = [p for e in engines_of(ray_router["url"]) for p in (e["engine_pid"], e["actor_pid"])]
    assert all(running(p) for p in pids)
    proc = ray_router["proc"]
    proc.terminate()
    assert proc.wait(60) == 0
    deadline = time.monotonic() + 30
    while any(running(p) for p in pids):
        assert time.monotonic() < deadline, "engines or actors outlived the router"
        time.sleep(0.2)
    subprocess.run([ray_bin(), "stop", "--force"], env=RAY_ENV, capture_output=True, timeout=120)
    deadline = time.monotonic() + 30
    while processes_mentioning(ray_cluster["temp"]):
        assert time.monotonic() < deadline, "Ray processes outlived `ray stop`"
        time.sleep(0.2)
