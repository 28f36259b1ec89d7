"""Two real engine processes (``loom engine``) on 127.0.0.1, each pinned to its own core,
and a router over them served in a thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_in_thread(app: Any) -> tuple[Any, str]:
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def engines(tiny_dir: Path) -> Iterator[list[Any]]:
    from loom.router.engines import start_engines

    procs = start_engines(2, str(tiny_dir), extra_args=["--num-pages", "256"], quiet=True)
    yield procs
    for p in procs:
        p.stop()


@pytest.fixture(scope="module")
def llm(tiny_dir: Path) -> Any:
    from loom import LLM

    return LLM(str(tiny_dir), num_pages=128)


@pytest.fixture(scope="module")
def router_url(engines: list[Any], tiny_dir: Path) -> Iterator[str]:
    """A router (default strategy) over ``engines``, served on a free port."""
    from loom.models.tokenizer import Tokenizer
    from loom.router.app import create_router_app
    from loom.router.strategies import StrategyRouter

    model = httpx.get(engines[0].url + "/v1/models").json()["data"][0]["id"]
    app = create_router_app(
        StrategyRouter([e.url for e in engines]), Tokenizer.from_dir(tiny_dir), model
    )
    server, url = serve_in_thread(app)
    yield url
    server.should_exit = True
