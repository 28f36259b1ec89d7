"""The router over HTTP: OpenAI clients in front, engines behind, strategies switched live;
and ``loom router`` as a user starts it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from loom import SamplingParams
from tests.router.conftest import free_port


def test_openai_client_through_the_router_with_live_strategy_switches(
    router_url: str, llm: Any
) -> None:
    client = openai.OpenAI(base_url=router_url + "/v1", api_key="x", max_retries=0)
    model = client.models.list().data[0].id
    text = "The river ran past the old mill where the miller kept his sacks of grain"
    want = llm.generate([text], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))[
        0
    ].text
    for strategy, balance in (
        ("dp", 0.0),
        ("pd", 0.0),
        ("balanced-pd", 0.3),
        ("prefix-pd", 0.0),
        ("dynamic", 0.0),
    ):
        r = httpx.post(
            router_url + "/admin/strategy", json={"strategy": strategy, "balance": balance}
        )
        assert r.status_code == 200 and r.json()["strategy"] == strategy.replace("balanced-", "")
        got = client.completions.create(
            model=model, prompt=text, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
        )
        assert got.choices[0].text == want, strategy
        stream = client.completions.create(
            model=model,
            prompt=text,
            max_tokens=10,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        assert "".join(c.choices[0].text for c in stream if c.choices) == want, strategy
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0
    )
    assert chat.choices[0].message.content is not None
    metrics = httpx.get(router_url + "/metrics").text
    assert 'loom_router_requests_total{strategy="pd"} ' in metrics
    sent = [ln for ln in metrics.splitlines() if ln.startswith("loom_router_kv_sent_bytes_total")]
    assert float(sent[0].split()[-1]) > 0  # the prefill engine shipped KV


def test_router_rejects_bad_requests(router_url: str) -> None:
    r = httpx.post(router_url + "/admin/strategy", json={"strategy": "teleport"})
    assert r.status_code == 400 and "unknown strategy" in r.json()["error"]["message"]
    r = httpx.post(router_url + "/v1/completions", json={"model": "tiny", "prompt": "x", "n": 2})
    assert r.status_code == 400
    r = httpx.post(router_url + "/v1/completions", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404


def test_loom_router_command(tiny_dir: Path, llm: Any) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "loom",
            "router",
            "--engines",
            "2",
            "--strategy",
            "pd",
            "--model",
            str(tiny_dir),
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=os.environ.copy(),
    )
    url = f"http://127.0.0.1:{port}"
    # Start-up lines name the engines it started (read before the end: the engines share
    # the pipe, so reading to its end would wait for them).
    engine_urls: list[str] = []
    assert proc.stderr is not None
    for raw in proc.stderr:
        line = raw.decode()
        engine_urls += re.findall(r"engine (http://127\.0\.0\.1:\d+) on cores", line)
        if "router (pd)" in line:
            break
    assert len(engine_urls) == 2, engine_urls
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, "the router exited"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the router did not start"
            time.sleep(0.3)
        health = httpx.get(url + "/health").json()
        assert len(health["engines"]) == 2 and all(e["alive"] for e in health["engines"])
        ids = list(range(300, 340))
        r = httpx.post(
            url + "/v1/completions",
            timeout=60,
            json={
                "model": "tiny",
                "prompt": ids,
                "max_tokens": 6,
                "temperature": 0,
                "ignore_eos": True,
            },
        )
        assert r.status_code == 200, r.text
        want = llm.generate([ids], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))[
            0
        ].text
        assert r.json()["choices"][0]["text"] == want
    finally:
        proc.terminate()
        proc.wait(60)
    # The router stopped the engines it started.
    for engine_url in engine_urls:
        with pytest.raises(httpx.HTTPError):
            httpx.get(engine_url + "/health", timeout=2)
