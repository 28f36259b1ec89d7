"""A tool server for agent tests and benchmarks: real HTTP on 127.0.0.1.

Tools, each answering after a configurable latency (``latency_ms``, or ``?delay_ms=`` on a
single request), the way a search API or a sandbox service would:

- ``GET /search?q=...``: the passages of a generated corpus that share most words with
  the query (``k`` of them, default 2), as plain text;
- ``GET /calc?expr=...``: an arithmetic expression (numbers, + - * / // % **, parentheses)
  evaluated without ``eval``; a bad expression is a 400 with the reason;
- ``GET /fact?key=...`` and ``POST /fact?key=...`` (the body is the value): a key-value
  fact store, preloaded with a few facts; an unknown key is a 404;
- ``POST /run``: the body is Python code, run in a subprocess (isolated mode, no
  environment) under a time and an address-space limit; the reply is its output, with the
  exit status in the ``x-exit-status`` header;
- ``GET /fail``: always a 500 (for error handling); ``GET /stats``: calls per tool, as JSON.

    python -m loom.testing.tool_server [--port 8801] [--latency-ms 50]
"""

from __future__ import annotations

import argparse
import ast
import json
import operator
import re
import resource
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from loom.models.corpus import tiny_corpus

FACTS = {
    "capital-of-france": "Paris",
    "boiling-point-of-water-c": "100",
    "speed-of-light-km-s": "299792",
    "loom-page-size": "16",
}

_OPS: dict[type, Callable[..., Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos,
}  # fmt: skip


def calculate(expr: str) -> float | int:
    """Evaluate an arithmetic expression; ValueError names what is not allowed."""
    if len(expr) > 200:
        raise ValueError("expression longer than 200 characters")
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an expression: {e.msg}") from None

    def ev(node: ast.AST) -> float | int:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            if isinstance(node.value, bool):
                raise ValueError("not allowed in an expression: a boolean")
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError("exponent larger than 64")
            return _OPS[type(node.op)](left, right)  # type: ignore[no-any-return]
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))  # type: ignore[no-any-return]
        raise ValueError(f"not allowed in an expression: {type(node).__name__}")

    try:
        return ev(tree)
    except ZeroDivisionError:
        raise ValueError("division by zero") from None


class Corpus:
    """Passages of generated sentences, searched by shared words."""

    def __init__(self, passages: int = 400, seed: int = 7) -> None:
        sentences = tiny_corpus(passages * 3, seed=seed)
        self.passages = [" ".join(sentences[i : i + 3]) for i in range(0, len(sentences), 3)]
        self._words = [set(_words(p)) for p in self.passages]

    def search(self, query: str, k: int = 2) -> list[str]:
        q = set(_words(query))
        scored = sorted(range(len(self.passages)), key=lambda i: (-len(q & self._words[i]), i))
        return [self.passages[i] for i in scored[:k]]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _limit_child(memory_bytes: int) -> Callable[[], None]:
    def apply() -> None:  # in the child, before exec
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))

    return apply


def run_code(code: str, timeout_s: float, memory_bytes: int) -> tuple[int, str]:
    """Run Python ``code`` in a limited subprocess: (exit status, output). A run past the
    time limit is killed and reported as status -9 with a note."""
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-c", code],
            capture_output=True,
            timeout=timeout_s,
            env={},
            preexec_fn=_limit_child(memory_bytes),
        )
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace")
        return -9, out + f"\n[killed: over the {timeout_s:g} s time limit]"
    text = (done.stdout + done.stderr).decode(errors="replace")
    return done.returncode, text[-4000:]


class _Server(ThreadingHTTPServer):
    # The stdlib's listen backlog of 5 drops the connections of a burst of agents calling
    # at once; each dropped SYN is retried after a second.
    request_queue_size = 1024


class ToolServer:
    """The tools on a threading HTTP server (one thread per request, so latencies of
    concurrent calls overlap as a real service's would)."""

    def __init__(
        self,
        port: int = 0,
        latency_ms: float = 0.0,
        *,
        code_timeout_s: float = 5.0,
        code_memory_mb: int = 512,
        seed: int = 7,
    ) -> None:
        self.latency_s = latency_ms / 1000.0
        self.code_timeout_s = code_timeout_s
        self.code_memory_bytes = code_memory_mb << 20
        self.corpus = Corpus(seed=seed)
        self.facts = dict(FACTS)
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.httpd = _Server(("127.0.0.1", port), _handler(self))
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> ToolServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> ToolServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def count(self, tool: str) -> None:
        with self._lock:
            self.calls[tool] += 1

    def handle(
        self, method: str, path: str, query: dict[str, str], body: bytes
    ) -> tuple[int, str] | tuple[int, str, dict[str, str]]:
        """(status, text[, headers]) of one call; the latency has been waited already."""
        if path == "/search" and method == "GET":
            k = max(1, min(10, int(query.get("k", "2"))))
            return 200, "\n".join(self.corpus.search(query.get("q", ""), k))
        if path == "/calc" and method == "GET":
            try:
                return 200, str(calculate(query.get("expr", "")))
            except ValueError as e:
                return 400, f"error: {e}"
        if path == "/fact":
            key = query.get("key", "")
            if method == "POST":
                with self._lock:
                    self.facts[key] = body.decode(errors="replace")
                return 200, "stored"
            with self._lock:
                value = self.facts.get(key)
            return (200, value) if value is not None else (404, f"error: no fact {key!r}")
        if path == "/run" and method == "POST":
            status, out = run_code(body.decode(errors="replace"), self.code_timeout_s,
                                   self.code_memory_bytes)  # fmt: skip
            return 200 if status == 0 else 422, out, {"x-exit-status": str(status)}
        if path == "/fail":
            return 500, "error: this tool always fails"
        if path == "/stats":
            with self._lock:
                return 200, json.dumps(dict(self.calls))
        return 404, f"error: no tool at {method} {path}"


def _handler(server: ToolServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self, method: str) -> None:
            parts = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            if parts.path != "/stats":
                server.count(parts.path.lstrip("/"))
                delay = query.get("delay_ms")
                time.sleep(float(delay) / 1000.0 if delay is not None else server.latency_s)
            headers: dict[str, str] = {}
            try:
                reply = server.handle(method, parts.path, query, body)
            except ValueError as e:
                reply = 400, f"error: {e}"
            status, text = reply[0], reply[1]
            if len(reply) == 3:
                headers = reply[2]
            data = text.encode()
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("content-type", "text/plain; charset=utf-8")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: benchmarks make thousands of calls

    return Handler


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Loom's tool server for agent tests and benchmarks")
    ap.add_argument("--port", type=int, default=8801)
    ap.add_argument("--latency-ms", type=float, default=50.0, help="added to every call")
    ap.add_argument("--code-timeout-s", type=float, default=5.0)
    ap.add_argument("--code-memory-mb", type=int, default=512)
    args = ap.parse_args(argv)
    server = ToolServer(args.port, args.latency_ms, code_timeout_s=args.code_timeout_s,
                        code_memory_mb=args.code_memory_mb)  # fmt: skip
    print(f"tool server on {server.url} (latency {args.latency_ms:g} ms)", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()


if __name__ == "__main__":
    main()
