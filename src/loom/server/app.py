"""The FastAPI application and ``serve``: one process with the engine worker, the
runtime, and HTTP + WebSocket on uvicorn."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, WebSocket
from fastapi.responses import JSONResponse, Response

from loom import __version__
from loom.api.errors import install_error_handlers
from loom.config import ServeConfig
from loom.server import inferlets_api, microserving_api, openai_api
from loom.server.auth import require_key
from loom.server.metrics import make_registry, render
from loom.server.state import ServerState
from loom.server.ws import Session


def create_app(state: ServerState) -> FastAPI:
    """The app over a started runtime (the caller owns the runtime's life)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.loop = asyncio.get_running_loop()
        yield

    app = FastAPI(title="Loom", version=__version__, lifespan=lifespan)
    app.state.loom = state
    install_error_handlers(app)
    app.include_router(openai_api.router)
    app.include_router(inferlets_api.router)
    app.include_router(microserving_api.router)
    registry = make_registry(state)

    @app.get("/health")
    async def health() -> Any:
        supervisor = state.runtime.supervisor
        body = {
            "status": supervisor.status,  # "ok", or why the engine cannot serve
            "model": state.model_name,
            "instances": len(state.instances),
            "engine_restarts": len(supervisor.restarts),
            "uptime_s": round(time.time() - state.started_at, 3),
        }
        return body if supervisor.failure is None else JSONResponse(body, status_code=503)

    # Behind the API key unless the operator opens it (a scraper without the key).
    guard = [] if state.config.server.metrics_public else [Depends(require_key)]

    @app.get("/metrics", dependencies=guard)
    async def metrics() -> Response:
        body = await asyncio.to_thread(render, registry)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.websocket("/v1/ws")
    async def websocket(ws: WebSocket) -> None:
        await Session(state, ws).run()

    return app


def start_state(config: ServeConfig, log: Any = None) -> ServerState:
    """Start the engine worker and the runtime described by ``config``."""
    from loom.runtime.runtime import start_runtime

    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    engine, server = config.engine, config.server
    say(f"loom: loading model {engine.model!r} ({engine.dtype}, {engine.device}, "
        f"{server.worker} worker)")  # fmt: skip
    t0 = time.perf_counter()
    runtime = start_runtime(
        engine,
        config.runtime,
        worker_mode=server.worker,
        engine_threads=server.engine_threads,
        pin_cpus=server.pin_cpus,
    )
    say(f"loom: model ready in {time.perf_counter() - t0:.1f} s: {runtime.model_name}, "
        f"{runtime.pool.num_pages} KV pages of {runtime.page_size} tokens, "
        f"context {runtime.max_model_len}; {runtime.placement.describe()}")  # fmt: skip
    return ServerState(runtime, config, server.served_model_name or runtime.model_name)


def serve(config: ServeConfig) -> int:
    """``loom serve``: run until interrupted."""
    import uvicorn

    from loom.api.shutdown import exit_cleanly_on_sigterm

    state = start_state(config)
    app = create_app(state)
    where = config.server
    uv_config = uvicorn.Config(app, host=where.host, port=where.port, log_level="warning",
                               ws_max_size=8 << 20)  # fmt: skip
    server = _AnnouncingServer(uv_config, state)
    exit_cleanly_on_sigterm()  # the engine worker stops with the server
    try:
        server.run()
    finally:
        state.runtime.close()
    return 0


class _AnnouncingServer:
    """uvicorn's server, saying where it listens once the socket is bound."""

    def __new__(cls, config: Any, state: ServerState) -> Any:
        import uvicorn

        class Server(uvicorn.Server):
            async def startup(self, sockets: Any = None) -> None:
                await super().startup(sockets)
                if self.started:
                    host, port = config.host, config.port
                    url = f"http://{host}:{port}"
                    print(
                        f"loom: serving {state.model_name} on {url} (OpenAI API at {url}/v1, "
                        f"inferlets at ws://{host}:{port}/v1/ws)",
                        file=sys.stderr,
                        flush=True,
                    )

        return Server(config)


class BackgroundServer:
    """The whole server in a background thread on 127.0.0.1 (tests, benchmarks, embedding):
    ``with BackgroundServer(config) as srv: use(srv.url)``. Port 0 picks a free port."""

    def __init__(self, config: ServeConfig, state: ServerState | None = None) -> None:
        import threading

        import uvicorn

        self.state = state or start_state(config, log=lambda msg: None)
        self.app = create_app(self.state)
        where = config.server
        uv_config = uvicorn.Config(self.app, host=where.host, port=where.port,
                                   log_level="warning", ws_max_size=8 << 20)  # fmt: skip
        self.server = uvicorn.Server(uv_config)
        self._thread = threading.Thread(target=self.server.run, name="loom-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        sock = self.server.servers[0].sockets[0]
        host, port = sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"

    def close(self, stop_runtime: bool = True) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
        if stop_runtime:
            self.state.runtime.close()

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
