"""``remote_send`` to an address that is not a Loom KV receiver fails at once with an
error saying so, instead of holding the engine for the full transfer timeout (before: a
silent port froze the engine's completions for ~60 s)."""

from __future__ import annotations

import socket
import time
from typing import Any

import httpx

PROMPT = [(i * 37) % 1900 + 50 for i in range(45)]


def post(srv: Any, path: str, **body: Any) -> httpx.Response:
    return httpx.post(srv.url + "/microserving/" + path, json=body, timeout=120)


def test_remote_send_to_a_silent_port_fails_fast(server: Any) -> None:
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never says a word
    try:
        prep = post(server, "prep_recv", prompt=PROMPT, end=-1, request_id="silent-1").json()
        host, port = silent.getsockname()[:2]
        t0 = time.monotonic()
        sent = post(server, "remote_send", prompt=PROMPT, end=-1, request_id="silent-1",
                    begin=prep["prefix_matched_length"], kv_addr_info=prep["kv_addr_info"],
                    recv_engine=f"{host}:{port}")  # fmt: skip
        took = time.monotonic() - t0
        assert sent.status_code >= 400 and "not a Loom KV receiver" in sent.text, sent.text
        assert took < 15, took  # the greeting timeout (2 s), not the transfer's (60 s)
        # The engine serves completions meanwhile and after.
        r = httpx.post(server.url + "/v1/completions", timeout=60, json={
            "model": server.state.model_name, "prompt": "Hello", "max_tokens": 4})  # fmt: skip
        assert r.status_code == 200
    finally:
        silent.close()
        post(server, "abort", request_id="silent-1")
