"""Bad input is refused with a 400 naming it, before it costs anything: text that is not
valid Unicode, prompts too long for the context (refused before tokenizing); and a
non-streaming request whose client left is abandoned, its generation cancelled."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest


def post(srv: Any, path: str, raw: str, timeout: float = 60) -> httpx.Response:
    return httpx.post(srv.url + path, content=raw.encode(), timeout=timeout,
                      headers={"content-type": "application/json"})  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", '{"model": "M", "prompt": "hi \\ud800 there", "max_tokens": 2}'),
        ("/v1/chat/completions",
         '{"model": "M", "messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 2}'),
        ("/v1/completions", '{"model": "M", "prompt": "hi", "stop": ["\\ud800"], "max_tokens": 2}'),
    ],
)  # fmt: skip
def test_a_lone_surrogate_is_a_400(server: Any, path: str, body: str) -> None:
    model = server.state.model_name
    r = post(server, path, body.replace('"M"', json.dumps(model)))
    assert r.status_code == 400, r.text
    assert "not valid Unicode" in r.json()["error"]["message"]


def test_an_oversized_prompt_is_refused_before_tokenizing(server: Any) -> None:
    model = server.state.model_name
    body = json.dumps({"model": model, "prompt": "word " * 2_000_000, "max_tokens": 1})
    r = post(server, "/v1/completions", body)
    assert r.status_code == 400
    assert "characters" in r.json()["error"]["message"]  # (the count is of characters)
    chat = json.dumps({"model": model, "max_tokens": 1,
                       "messages": [{"role": "user", "content": "word " * 2_000_000}]})  # fmt: skip
    r = post(server, "/v1/chat/completions", chat)
    assert r.status_code == 400 and "characters" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_a_request_whose_client_left_is_cancelled(tiny_dir: Any, tmp_path: Any) -> None:
    from loom.config import ServeConfig
    from loom.server.app import BackgroundServer

    # 20 ms per pass: running to the end of the context would take tens of seconds.
    config = ServeConfig.of(model=str(tiny_dir), port=0, worker="thread", num_pages=256,
                            engine_step_ms=20.0, program_dir=str(tmp_path))  # fmt: skip
    with BackgroundServer(config) as srv:
        rt = srv.state.runtime
        body = json.dumps({"model": srv.state.model_name, "prompt": "Once upon a time",
                           "max_tokens": 100_000, "ignore_eos": True})  # fmt: skip
        with pytest.raises(httpx.ReadTimeout):
            post(srv, "/v1/completions", body, timeout=1.0)
        deadline = time.monotonic() + 5
        while rt.query(lambda: len(rt.instances)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rt.query(lambda: len(rt.instances)) == 0  # cancelled, not run to its end
        assert rt.query(lambda: rt.pool.num_available()) == rt.pool.num_pages  # nothing held
