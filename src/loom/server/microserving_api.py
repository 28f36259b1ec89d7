"""Microserving endpoints of an engine: ``/microserving/prep_recv``, ``remote_send``,
``start_generate`` (and ``abort``), over ``Runtime.microserving``; ``/microserving/peers``
to register the KV receivers ``remote_send`` may send to (a router, for its engines).

Every route needs the API key when the engine has one. Reservations count against the
calling client: its API key (by a digest, never the key) or, without keys, its address."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from loom.api.errors import ApiError
from loom.api.openai_models import _Sampling
from loom.runtime.completions import CompletionHandle, new_handle
from loom.runtime.completions import CompletionRequest as RuntimeRequest
from loom.runtime.microserving_wire import MicroservingError
from loom.server.auth import require_key
from loom.server.openai_api import checked_prompt, serve_choices
from loom.server.state import ServerState

router = APIRouter(dependencies=[Depends(require_key)])

RequestId = Field(min_length=1, max_length=200, description="shared by the three calls")


class _Windowed(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: list[int] | str = Field(description="token ids (or text, tokenized here)")
    request_id: str = RequestId
    model: str | None = None


class PrepRecvRequest(_Windowed):
    end: int = Field(description="reserve slots for prompt[matched:end]; negative counts back")


class RemoteSendRequest(_Windowed):
    begin: int
    end: int
    kv_addr_info: str = Field(min_length=1)
    recv_engine: str = Field(min_length=3, description="the receiver's KV address, host:port")


class StartGenerateRequest(_Sampling):
    model: str = ""
    prompt: list[int] | str
    request_id: str = RequestId
    begin: int = 0
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=20)


class PeersRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    peers: list[str] = Field(max_length=256, description="KV receivers, 'host:port' each")


class AbortRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: str = RequestId


def _state(request: Request) -> ServerState:
    return request.app.state.loom  # type: ignore[no-any-return]


def _client(request: Request) -> str:
    """Whose quota a reservation counts against: the API key when the server has keys
    (``require_key`` checked it), else the client's address."""
    if _state(request).config.server.api_keys:
        key = request.headers.get("authorization", "").partition(" ")[2].strip()
        return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]
    return "addr:" + (request.client.host if request.client else "?")


def _tokens(st: ServerState, prompt: list[int] | str) -> list[int]:
    ids = st.runtime.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    return checked_prompt(st, ids, "prompt")


async def _call(st: ServerState, fn: Any) -> dict[str, Any]:
    """Run ``fn(reply)`` on the runtime thread and await its reply."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()

    def settle(value: Any) -> None:
        if not fut.done():
            fut.set_result(value)

    def reply(value: Any) -> None:  # runtime thread
        loop.call_soon_threadsafe(settle, value)

    st.runtime.call_soon(lambda: fn(reply))
    value = await fut
    if isinstance(value, MicroservingError):
        kind = "server_error" if value.status >= 500 else "invalid_request_error"
        raise ApiError(value.status, value.message, code=value.code, kind=kind)
    return value  # type: ignore[no-any-return]


@router.post("/microserving/prep_recv")
async def prep_recv(body: PrepRecvRequest, request: Request) -> dict[str, Any]:
    st = _state(request)
    st.count("prep_recv")
    prompt = _tokens(st, body.prompt)
    ms = st.runtime.microserving
    client = _client(request)
    return await _call(
        st, lambda reply: ms.prep_recv(body.request_id, prompt, body.end, reply, client)
    )


@router.post("/microserving/remote_send")
async def remote_send(body: RemoteSendRequest, request: Request) -> dict[str, Any]:
    st = _state(request)
    st.count("remote_send")
    prompt = _tokens(st, body.prompt)
    ms = st.runtime.microserving
    return await _call(
        st,
        lambda reply: ms.remote_send(
            body.request_id,
            prompt,
            body.begin,
            body.end,
            body.kv_addr_info,
            body.recv_engine,
            reply,
        ),
    )


@router.post("/microserving/start_generate", response_model=None)
async def start_generate(body: StartGenerateRequest, request: Request) -> Any:
    st = _state(request)
    st.count("start_generate")
    if body.n != 1:
        raise ApiError(400, "start_generate takes n=1", param="n")
    prompt = _tokens(st, body.prompt)
    ms = st.runtime.microserving
    rid, begin = body.request_id, body.begin
    await _call(st, lambda reply: ms.check_start(rid, prompt, begin, reply))
    rt = st.runtime

    def submit(req: RuntimeRequest) -> CompletionHandle:
        handle = new_handle(rt.post)
        rt.call_soon(lambda: ms.start_generate(rid, begin, req, handle.id))
        return handle

    return await serve_choices(
        st, body, [prompt], chat=False, logprobs=body.logprobs, submit=submit
    )


@router.get("/microserving/peers")
async def peers(request: Request) -> dict[str, Any]:
    """This engine's KV receiver (started now if need be) and the peers registered."""
    ms = _state(request).runtime.microserving
    return await _call(_state(request), lambda reply: ms.register_peers([], reply))


@router.post("/microserving/peers")
async def add_peers(body: PeersRequest, request: Request) -> dict[str, Any]:
    """Let ``remote_send`` send to these KV receivers (added to those known)."""
    ms = _state(request).runtime.microserving
    return await _call(_state(request), lambda reply: ms.register_peers(body.peers, reply))


@router.post("/microserving/abort")
async def abort(body: AbortRequest, request: Request) -> dict[str, Any]:
    """Drop a reservation now (a router whose client went away); false if there was none."""
    st = _state(request)
    ms = st.runtime.microserving
    found = await asyncio.to_thread(st.runtime.query, lambda: ms.abort(body.request_id))
    return {"aborted": bool(found)}
