"""The router's HTTP face: ``/v1/completions`` and ``/v1/chat/completions`` served by a
strategy over engines, ``/admin/strategy`` to switch strategies live, ``/health`` and
``/metrics``; ``/admin/engines`` to add and remove engines (``admin_api.py``) and
inferlets run on the engines (``inferlets_api.py``). With API keys every route but
``/health`` needs one."""

from __future__ import annotations

import hmac
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from loom.api.errors import ApiError, install_error_handlers
from loom.api.openai_models import ChatCompletionRequest, CompletionRequest
from loom.models.tokenizer import Tokenizer
from loom.router.admin_api import admin_routes
from loom.router.inferlets_api import ProgramStore, inferlet_routes
from loom.router.manage import EngineManager
from loom.router.router import RoutedRequest, RouterError
from loom.router.strategies import STRATEGIES, StrategyRouter, make_strategy
from loom.router.ws_proxy import ProxySession

_ids = itertools.count(1)


class StrategyChange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    strategy: str = Field(description=", ".join(STRATEGIES))
    balance: float = Field(default=0.0, ge=0.0, lt=1.0)
    options: dict[str, Any] = Field(default_factory=dict)


def key_check(api_keys: tuple[str, ...]) -> Any:
    """A dependency refusing requests without one of ``api_keys`` (none: everyone passes)."""

    async def check(request: Request) -> None:
        if not api_keys:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        given = key.strip().encode()
        if scheme.lower() != "bearer" or not any(
            hmac.compare_digest(given, k.encode()) for k in api_keys
        ):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key", kind="authentication_error")  # fmt: skip

    return Depends(check)


def create_router_app(
    router: StrategyRouter,
    tokenizer: Tokenizer,
    model_name: str,
    api_keys: tuple[str, ...] = (),
    health_interval_s: float = 2.0,
    manager: EngineManager | None = None,
    engine_api_key: str | None = None,
) -> FastAPI:
    """The app over ``router`` (closed when the app shuts down); ``api_keys``: what its
    clients must send; ``health_interval_s``: how often engines are probed (0: only on
    ``/health``); ``manager``: how engines join and leave (default: by URL only);
    ``engine_api_key``: the key of the router's calls to engines."""
    manager = manager or EngineManager(router)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        router.start_probing(health_interval_s)
        manager.start(health_interval_s)
        yield
        await manager.close()
        await router.close()

    guard = [key_check(tuple(api_keys))]
    app = FastAPI(title="Loom router", lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(admin_routes(manager, guard))
    store = ProgramStore(engine_api_key)
    app.include_router(inferlet_routes(router, store, guard))

    @app.websocket("/v1/ws")
    async def inferlet_protocol(ws: WebSocket) -> None:
        """The inferlet protocol, launches spread over the engines (``ws_proxy.py``)."""
        await ProxySession(ws, router, store, tuple(api_keys), model_name).run()

    counts: dict[str, int] = {}

    def sampling(body: Any) -> dict[str, Any]:
        if body.n != 1:
            raise ApiError(400, "the router serves n=1", param="n")
        fields = (
            "max_tokens",
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "seed",
            "stop",
            "ignore_eos",
        )
        return {f: getattr(body, f) for f in fields if getattr(body, f) is not None}

    def check_model(model: str) -> None:
        if model not in (model_name, "tiny"):
            raise ApiError(
                404,
                f"model {model!r} does not exist",
                param="model",
                code="model_not_found",
                kind="not_found_error",
            )

    async def collect(req: RoutedRequest) -> tuple[str, str | None, dict[str, Any] | None]:
        text, finish, usage = [], None, None
        try:
            async for chunk in router.handle(req):
                for c in chunk.get("choices", []):
                    text.append(c.get("text") or "")
                    finish = c.get("finish_reason") or finish
                usage = chunk.get("usage") or usage
        except RouterError as e:
            kind = "server_error" if e.status >= 500 else "invalid_request_error"
            raise ApiError(e.status, e.message, code=e.code, kind=kind) from None
        return "".join(text), finish, usage

    async def respond(prompt: list[int], body: Any, chat: bool) -> Any:
        """Route one request; stream its chunks or answer with the whole completion."""
        counts[router.strategy.name] = counts.get(router.strategy.name, 0) + 1
        req = RoutedRequest(prompt, f"r{next(_ids)}-{uuid.uuid4().hex[:8]}", sampling(body))
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{req.request_id}"
        created = int(time.time())
        if body.stream:
            usage_wanted = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _relay(router, req, rid, created, model_name, chat, usage_wanted),
                media_type="text/event-stream",
            )
        text, finish, usage = await collect(req)
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return JSONResponse({
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": model_name,
            "usage": usage,
            "choices": [choice],
        })  # fmt: skip

    @app.post("/v1/completions", response_model=None, dependencies=guard)
    async def completions(body: CompletionRequest) -> Any:
        check_model(body.model)
        p = body.prompt
        if isinstance(p, str):
            prompt = tokenizer.encode(p)
        elif p and all(isinstance(x, int) for x in p):
            prompt = list(p)  # type: ignore[arg-type]
        else:
            raise ApiError(400, "the router takes one prompt (text or token ids)", param="prompt")
        return await respond(prompt, body, chat=False)

    @app.post("/v1/chat/completions", response_model=None, dependencies=guard)
    async def chat(body: ChatCompletionRequest) -> Any:
        check_model(body.model)
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            prompt = tokenizer.encode(tokenizer.apply_chat_template(messages))
        except Exception as e:
            raise ApiError(400, f"cannot apply the chat template: {e}", param="messages") from None
        return await respond(prompt, body, chat=True)

    @app.get("/v1/models", dependencies=guard)
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "owned_by": "loom"}],
        }

    @app.get("/admin/strategy", dependencies=guard)
    async def get_strategy() -> dict[str, Any]:
        return router.strategy.describe()

    @app.post("/admin/strategy", dependencies=guard)
    async def set_strategy(change: StrategyChange) -> dict[str, Any]:
        try:
            router.strategy = make_strategy(change.strategy, change.balance, **change.options)
        except (ValueError, TypeError) as e:
            raise ApiError(400, str(e), param="strategy") from None
        return router.strategy.describe()

    @app.get("/health")
    async def health() -> Any:
        """Every engine probed now: "ok", "degraded" (some down) or "down" (503)."""
        await router.probe()
        alive = sum(e.alive for e in router.engines)
        status = "ok" if alive == len(router.engines) else "degraded" if alive else "down"
        engines = [{"url": e.url, "alive": e.alive, "running": e.running, "error": e.error}
                   for e in router.engines]  # fmt: skip
        return JSONResponse({"status": status, "engines": engines},
                            status_code=200 if alive else 503)  # fmt: skip

    @app.get("/metrics", dependencies=guard)
    async def metrics() -> Response:
        lines = ["# TYPE loom_router_requests_total counter"]
        lines += [f'loom_router_requests_total{{strategy="{k}"}} {v}' for k, v in counts.items()]
        lines += [
            "# TYPE loom_router_retries_total counter",
            f"loom_router_retries_total {router.retries}",
            "# TYPE loom_router_engine_running gauge",
        ]
        for e in router.engines:
            lines.append(f'loom_router_engine_running{{engine="{e.url}"}} {e.running}')
        lines.append("# TYPE loom_router_kv_sent_bytes_total counter")
        for e in router.engines:
            lines.append(f'loom_router_kv_sent_bytes_total{{engine="{e.url}"}} {e.sent_bytes}')
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    return app


async def _relay(
    router: StrategyRouter,
    req: RoutedRequest,
    rid: str,
    created: int,
    model: str,
    chat: bool,
    usage_wanted: bool,
) -> AsyncIterator[str]:
    kind = "chat.completion.chunk" if chat else "text_completion"
    if chat:
        first = {
            "id": rid,
            "object": kind,
            "created": created,
            "model": model,
            "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            ],
        }
        yield f"data: {json.dumps(first)}\n\n"
    try:
        async for chunk in router.handle(req):
            out: dict[str, Any] = {"id": rid, "object": kind, "created": created, "model": model}
            choices = []
            for c in chunk.get("choices", []):
                if chat:
                    delta = {"content": c.get("text") or ""} if c.get("text") else {}
                    choices.append(
                        {"index": 0, "delta": delta, "finish_reason": c.get("finish_reason")}
                    )
                else:
                    choices.append({**c, "index": 0})
            out["choices"] = choices
            if chunk.get("usage") is not None:
                if not usage_wanted:
                    continue
                out["usage"] = chunk["usage"]
            yield f"data: {json.dumps(out)}\n\n"
    except RouterError as e:
        yield f"data: {json.dumps({'error': {'message': e.message, 'code': e.code}})}\n\n"
    yield "data: [DONE]\n\n"
