"""Outgoing HTTP stays inside the policy: a redirect to a host the allow-list lacks is
refused (every hop is checked), and error responses are held to the body cap."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from typing import Any

import pytest


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.path == "/redirect":
            port = self.server.server_address[1]
            self.send_response(302)
            self.send_header("location", f"http://127.0.0.1:{port}/secret")
            self.end_headers()
            return
        big = self.path == "/big-error"
        body = b"x" * 50_000 if big else b"the secret"
        self.send_response(500 if big else 200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # a 302 after a POST is followed with a GET
        body = b"the secret"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def test_a_redirect_out_of_the_allow_list_is_refused(rrt: Any, testkit: str, port: int) -> None:
    saved = rrt.reconfigure(http_allow_hosts=("localhost",))
    try:
        end = rrt.launch(testkit, ["http", f"http://localhost:{port}/redirect"]).wait(30)
        assert not end.ok and "redirect refused" in (end.error or "")
        # The host it points at is reachable when allowed directly (the refusal is the
        # policy's, not the network's).
        rrt.reconfigure(http_allow_hosts=("localhost", "127.0.0.1"))
        h = rrt.launch(testkit, ["http", f"http://localhost:{port}/redirect"])
        assert h.wait(30).ok and h.recv(5) == "200 the secret"
    finally:
        rrt.reconfigure(saved)


def test_an_error_response_is_held_to_the_body_cap(rrt: Any, testkit: str, port: int) -> None:
    saved = rrt.reconfigure(http_allow_hosts=("127.0.0.1",), max_message_bytes=10_000)
    try:
        end = rrt.launch(testkit, ["http", f"http://127.0.0.1:{port}/big-error"]).wait(30)
        assert not end.ok and "response body exceeds the message-size cap" in (end.error or "")
    finally:
        rrt.reconfigure(saved)
