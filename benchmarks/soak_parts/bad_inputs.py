"""Bad input to the OpenAI API and to the inferlet WebSocket protocol, each with the answer
the server must give (a 4xx naming the problem, a protocol error, a closed connection).
``BAD_INPUTS`` maps each kind to a check returning ``(as_expected, what came back)``.

They come from loopback addresses of their own, not the well-behaved clients' 127.0.0.1:
127.0.0.3 for the wrong keys (the server refuses an address after too many failed key
checks: a 401, then 429 until the minute is over, both refusals), 127.0.0.2 for the
rest (with the right key)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import msgpack
import websockets

BAD_ADDRESS = "127.0.0.2"  # bad input with the right key
WRONG_KEY_ADDRESS = "127.0.0.3"  # wrong keys


class Target:
    def __init__(self, url: str, api_key: str, model: str) -> None:
        self.url, self.api_key, self.model = url, api_key, model
        self.auth = {"authorization": f"Bearer {api_key}"}

    def http(self, timeout: float = 60, address: str = BAD_ADDRESS, **kw: Any) -> httpx.AsyncClient:
        transport = httpx.AsyncHTTPTransport(local_address=address)
        return httpx.AsyncClient(timeout=timeout, transport=transport, **kw)

    async def post_raw(
        self, path: str, raw: str, headers: dict[str, str] | None = None, timeout: float = 60
    ) -> httpx.Response:
        address = BAD_ADDRESS if headers is None else WRONG_KEY_ADDRESS
        async with self.http(timeout, address) as http:
            return await http.post(
                self.url + path,
                content=raw.encode("utf-8", "surrogatepass"),
                headers={
                    "content-type": "application/json",
                    **(self.auth if headers is None else headers),
                },
            )

    def body(self, **fields: Any) -> str:
        return json.dumps({"model": self.model, "max_tokens": 2, **fields})


Check = Callable[[Target], Awaitable[tuple[bool, str]]]


def _status(r: httpx.Response, *codes: int, needle: str = "") -> tuple[bool, str]:
    if r.status_code in codes and needle in r.text:
        return True, f"refused: {r.status_code}"
    return False, f"{r.status_code} {r.text[:160]}"


async def lone_surrogate(t: Target) -> tuple[bool, str]:
    raw = t.body(prompt="x").replace('"x"', '"hi \\ud800 there"')
    return _status(await t.post_raw("/v1/completions", raw), 400, needle="not valid Unicode")


async def lone_surrogate_chat(t: Target) -> tuple[bool, str]:
    raw = t.body(messages=[{"role": "user", "content": "x"}]).replace('"x"', '"\\udfff"')
    return _status(await t.post_raw("/v1/chat/completions", raw), 400, needle="not valid Unicode")


async def huge_prompt(t: Target) -> tuple[bool, str]:
    raw = t.body(prompt="word " * 2_000_000, max_tokens=1)
    return _status(await t.post_raw("/v1/completions", raw), 400, needle="characters")


async def unknown_field(t: Target) -> tuple[bool, str]:
    raw = t.body(prompt="hi", bogus_field=1)
    return _status(await t.post_raw("/v1/completions", raw), 400, needle="bogus_field")


async def malformed_json(t: Target) -> tuple[bool, str]:
    return _status(await t.post_raw("/v1/completions", '{"model": "x", "prompt": '), 400)


async def bad_parameter(t: Target) -> tuple[bool, str]:
    raw = t.body(prompt="hi", max_tokens=-5, temperature="hot")
    return _status(await t.post_raw("/v1/completions", raw), 400)


async def unknown_model(t: Target) -> tuple[bool, str]:
    raw = json.dumps({"model": "no-such-model", "prompt": "hi", "max_tokens": 2})
    return _status(await t.post_raw("/v1/completions", raw), 400, 404)


async def wrong_api_key(t: Target) -> tuple[bool, str]:
    r = await t.post_raw(
        "/v1/completions", t.body(prompt="hi"), headers={"authorization": "Bearer wrong-key"}
    )
    return _status(r, 401, 429)


async def no_api_key(t: Target) -> tuple[bool, str]:
    r = await t.post_raw(
        "/v1/chat/completions", t.body(messages=[{"role": "user", "content": "hi"}]), headers={}
    )
    return _status(r, 401, 429)


async def metrics_without_key(t: Target) -> tuple[bool, str]:
    async with t.http(30, WRONG_KEY_ADDRESS) as http:
        return _status(await http.get(t.url + "/metrics"), 401, 429)


async def leaves_mid_request(t: Target) -> tuple[bool, str]:
    """A non-streaming request for the whole context; the client gives up after 0.5 s
    (the server must cancel the generation: the leak checks see it if not)."""
    raw = t.body(prompt="Once upon a time", max_tokens=100_000, ignore_eos=True)
    try:
        r = await t.post_raw("/v1/completions", raw, timeout=0.5)
    except httpx.TimeoutException:
        return True, "left after 0.5 s"
    if r.status_code < 500:
        return True, f"answered before the client left: {r.status_code}"
    return False, f"answered before the client left: {r.status_code} {r.text[:160]}"


async def leaves_mid_stream(t: Target) -> tuple[bool, str]:
    body = json.loads(t.body(prompt="Once upon a time", max_tokens=100_000, ignore_eos=True))
    async with (
        t.http(30, headers=t.auth) as http,
        http.stream("POST", t.url + "/v1/completions", json={**body, "stream": True}) as r,
    ):
        if r.status_code != 200:
            return False, f"{r.status_code} {(await r.aread())[:160]!r}"
        n = 0
        async for line in r.aiter_lines():
            n += line.startswith("data: ")
            if n >= 3:
                break
    return n >= 3, f"left after {n} chunks"


async def _ws(t: Target, address: str = BAD_ADDRESS) -> Any:
    return await websockets.connect(
        t.url.replace("http://", "ws://") + "/v1/ws",
        max_size=16 << 20,
        open_timeout=30,
        local_addr=(address, 0),
    )


async def _ask(ws: Any, frame: dict[str, Any]) -> dict[str, Any]:
    await ws.send(msgpack.packb(frame, use_bin_type=True))
    return await _reply(ws)


async def _reply(ws: Any) -> dict[str, Any]:
    while True:  # (events of other instances never reach a fresh connection)
        reply: dict[str, Any] = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 30), raw=False)
        if reply.get("type") in ("ok", "error"):
            return reply


async def _hello(ws: Any, t: Target) -> None:
    reply = await _ask(ws, {"type": "hello", "id": 1, "version": 1, "api_key": t.api_key})
    if reply.get("type") != "ok":
        raise RuntimeError(f"hello refused: {reply}")


def _code(reply: dict[str, Any], code: str) -> tuple[bool, str]:
    if reply.get("code") == code:
        return True, f"refused: {code}"
    return False, str(reply)[:160]


async def ws_wrong_key(t: Target) -> tuple[bool, str]:
    """A wrong key: refused, and the connection is closed (no second guess)."""
    ws = await _ws(t, WRONG_KEY_ADDRESS)
    try:
        reply = await _ask(ws, {"type": "hello", "id": 1, "version": 1, "api_key": "wrong"})
        if reply.get("code") != "unauthenticated":
            return False, f"hello answered {reply}"
        try:
            await _ask(ws, {"type": "hello", "id": 2, "version": 1, "api_key": t.api_key})
        except websockets.ConnectionClosed:
            locked = "too many failed" in str(reply.get("message"))
            return True, "refused (address locked out), closed" if locked else "refused, closed"
        return False, "a second hello on the same connection was answered"
    finally:
        await ws.close()


async def ws_no_hello(t: Target) -> tuple[bool, str]:
    ws = await _ws(t)
    try:
        reply = await _ask(ws, {"type": "list", "id": 1})
        return _code(reply, "unauthenticated")
    finally:
        await ws.close()


async def ws_garbage_frame(t: Target) -> tuple[bool, str]:
    ws = await _ws(t)
    try:
        await _hello(ws, t)
        await ws.send(b"\xc1\xc1 not msgpack")
        reply = await _reply(ws)
        return _code(reply, "bad_frame")
    finally:
        await ws.close()


async def ws_oversized_frame(t: Target) -> tuple[bool, str]:
    ws = await _ws(t)
    try:
        await _hello(ws, t)
        blob = os.urandom(5 << 20)
        try:
            reply = await _ask(
                ws, {"type": "upload_chunk", "id": 2, "hash": "0" * 64, "data": blob}
            )
        except websockets.ConnectionClosed as e:
            return True, f"connection closed: {e}"[:160]
        return _code(reply, "too_large")
    finally:
        await ws.close()


async def ws_bad_program(t: Target) -> tuple[bool, str]:
    """A well-formed upload of bytes that are not a WebAssembly component."""
    ws = await _ws(t)
    try:
        await _hello(ws, t)
        data = b"\0asm not really " + os.urandom(4096)
        digest = hashlib.sha256(data).hexdigest()
        await _ask(ws, {"type": "upload_start", "id": 2, "hash": digest, "size": len(data)})
        await _ask(ws, {"type": "upload_chunk", "id": 3, "hash": digest, "data": data})
        reply = await _ask(ws, {"type": "upload_end", "id": 4, "hash": digest})
        return _code(reply, "bad_program")
    finally:
        await ws.close()


async def ws_unknown_program(t: Target) -> tuple[bool, str]:
    ws = await _ws(t)
    try:
        await _hello(ws, t)
        reply = await _ask(ws, {"type": "launch", "id": 2, "program": os.urandom(32).hex()})
        return _code(reply, "unknown_program")
    finally:
        await ws.close()


BAD_INPUTS: dict[str, Check] = {
    "openai: lone surrogate (completion)": lone_surrogate,
    "openai: lone surrogate (chat)": lone_surrogate_chat,
    "openai: 10 MB prompt": huge_prompt,
    "openai: unknown field": unknown_field,
    "openai: malformed JSON": malformed_json,
    "openai: bad parameters": bad_parameter,
    "openai: unknown model": unknown_model,
    "openai: wrong API key": wrong_api_key,
    "openai: no API key": no_api_key,
    "openai: client leaves mid-request": leaves_mid_request,
    "openai: client leaves mid-stream": leaves_mid_stream,
    "metrics without the key": metrics_without_key,
    "ws: wrong-key hello": ws_wrong_key,
    "ws: no hello": ws_no_hello,
    "ws: garbage frame": ws_garbage_frame,
    "ws: oversized frame": ws_oversized_frame,
    "ws: upload of a non-program": ws_bad_program,
    "ws: launch of an unknown program": ws_unknown_program,
}
