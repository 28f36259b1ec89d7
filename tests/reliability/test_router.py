"""The router under failure and hostile clients: its own API key (admin routes included)
and the engines' key passed on; a dead decode engine's requests rerun on a live engine,
even mid-answer, and ``/health`` says the engine is dead; SIGTERM finishes what is in
flight, stops the engines it started and exits 0.

(Before: no key of its own, none passed on; a killed decode engine failed its 4 streams
with 503 while ``/health`` still called it alive.)"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ROUTER_KEY, ENGINE_KEY = "router-key", "engine-key"
AUTH = {"Authorization": f"Bearer {ROUTER_KEY}"}


@pytest.fixture(scope="module")
def engines(tiny_dir: Path) -> Iterator[list[Any]]:
    """Two engines that need ``ENGINE_KEY`` (also their KV secret)."""
    from loom.router.engines import start_engines

    procs = start_engines(2, str(tiny_dir), extra_args=["--num-pages", "256"], quiet=True,
                          env={"LOOM_API_KEY": ENGINE_KEY})  # fmt: skip
    yield procs
    for p in procs:
        p.stop()


@pytest.fixture(scope="module")
def router_url(engines: list[Any], tiny_dir: Path) -> Iterator[str]:
    import uvicorn

    from loom.models.tokenizer import Tokenizer
    from loom.router.app import create_router_app
    from loom.router.strategies import PrefillDecode, StrategyRouter

    router = StrategyRouter([e.url for e in engines], PrefillDecode(), api_key=ENGINE_KEY)
    app = create_router_app(router, Tokenizer.from_dir(tiny_dir), "tiny", (ROUTER_KEY,),
                            health_interval_s=0.5)  # fmt: skip
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    server.should_exit = True


def complete(url: str, prompt: list[int], max_tokens: int, **kw: Any) -> httpx.Response:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    return httpx.post(url + "/v1/completions", json=body, timeout=120, **kw)


def test_the_router_needs_its_key_and_passes_the_engines_theirs(
    router_url: str, engines: list[Any]
) -> None:
    prompt = list(range(300, 340))
    assert complete(router_url, prompt, 4).status_code == 401
    assert (
        complete(router_url, prompt, 4, headers={"Authorization": "Bearer no"}).status_code == 401
    )
    assert httpx.get(router_url + "/admin/strategy").status_code == 401
    change = {"strategy": "dp"}
    assert httpx.post(router_url + "/admin/strategy", json=change).status_code == 401
    assert httpx.get(router_url + "/metrics").status_code == 401
    assert httpx.get(router_url + "/health").status_code == 200  # open, like an engine's
    # The engines refuse callers without their key; the router has it, and its P/D
    # transfers pass the engines' KV secret check.
    assert httpx.get(engines[0].url + "/v1/models").status_code == 401
    r = complete(router_url, prompt, 6, headers=AUTH)
    assert r.status_code == 200, r.text
    metrics = httpx.get(router_url + "/metrics", headers=AUTH).text
    sent = [ln for ln in metrics.splitlines() if ln.startswith("loom_router_kv_sent_bytes_total")]
    assert float(sent[0].split()[-1]) > 0, metrics  # KV went from engine 0 to engine 1


def stream(url: str, prompt: list[int], max_tokens: int, first: threading.Event) -> str:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    text = []
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=AUTH,
                      timeout=120) as resp:  # fmt: skip
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            text += [c.get("text") or "" for c in chunk.get("choices", [])]
            first.set()
    return "".join(text)


def test_a_dead_decode_engine_is_rerun_on_a_live_one_and_health_says_so(
    router_url: str, engines: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs last in this module: it kills engine 1 (the decode engine of P/D)."""
    from loom.router import fleet

    # A failed engine sits out 0.3 s instead of 5: past that, only probing knows it is dead.
    monkeypatch.setattr(fleet, "DOWN_FOR_S", 0.3)
    prompts = [[7 + k, *range(400 + 10 * k, 460 + 10 * k)] for k in range(4)]
    n = 600
    # What each answer is with both engines up (the same engines, the same path).
    want = [complete(router_url, p, n, headers=AUTH).json()["choices"][0]["text"] for p in prompts]
    firsts = [threading.Event() for _ in prompts]
    got: dict[int, Any] = {}

    def run(k: int) -> None:
        try:
            got[k] = stream(router_url, prompts[k], n, firsts[k])
        except BaseException as e:  # reported below
            got[k] = e

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for f in firsts:
        assert f.wait(60)
    engines[1].proc.kill()  # mid-answer for all four
    for t in threads:
        t.join(120)
    assert [got[k] for k in range(4)] == want
    metrics = httpx.get(router_url + "/metrics", headers=AUTH).text
    assert "loom_router_retries_total 4" in metrics  # each stream reran once, mid-answer
    time.sleep(1.0)
    health = httpx.get(router_url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "degraded", health.text
    alive = {e["url"]: e["alive"] for e in health.json()["engines"]}
    assert alive == {engines[0].url: True, engines[1].url: False}
    # New requests go to the live engine, without a failed attempt first.
    r = complete(router_url, prompts[0], 8, headers=AUTH)
    assert r.status_code == 200 and want[0].startswith(r.json()["choices"][0]["text"])
    metrics = httpx.get(router_url + "/metrics", headers=AUTH).text
    assert "loom_router_retries_total 4" in metrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_sigterm_finishes_requests_in_flight_and_stops_the_engines(tiny_dir: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "loom", "router", "--engines", "2", "--model", str(tiny_dir),
         "--port", str(port), "--api-key", ROUTER_KEY],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    engine_urls: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            engine_urls += re.findall(r"engine (http://127\.0\.0\.1:\d+) on cores", line)
            if "router (pd)" in line:
                break
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe open
        deadline = time.monotonic() + 60
        while True:
            status = None
            with contextlib.suppress(httpx.HTTPError):
                status = httpx.get(url + "/health", timeout=1).status_code
            if status == 200:
                break
            assert time.monotonic() < deadline and proc.poll() is None, "the router did not start"
            time.sleep(0.2)
        # It started its engines with the router's key.
        assert httpx.get(engine_urls[0] + "/v1/models").status_code == 401
        hdr = {"Authorization": f"Bearer {ROUTER_KEY}"}
        assert httpx.get(engine_urls[0] + "/v1/models", headers=hdr).status_code == 200
        body = {"model": "tiny", "prompt": list(range(100, 160)), "max_tokens": 800,
                "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
        chunks, done = 0, False
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=AUTH,
                          timeout=60) as resp:  # fmt: skip
            for line in resp.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunks += 1
                    if chunks == 2:
                        proc.send_signal(signal.SIGTERM)
                        time.sleep(0.3)  # it stops accepting at once
                        with pytest.raises(httpx.ConnectError):
                            httpx.get(url + "/health", timeout=2)
        assert done and chunks >= 800  # the request in flight finished whole
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    for engine_url in engine_urls:
        with pytest.raises(httpx.HTTPError):
            httpx.get(engine_url + "/health", timeout=2)
