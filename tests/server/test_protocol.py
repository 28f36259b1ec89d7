"""The inferlet protocol over a real WebSocket: the client library, raw bad frames, SSE."""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

import httpx
import msgpack
import pytest
import websockets

from loom.client import Client, ClientError, SyncClient
from tests.server.conftest import API_KEY


def ws_url(server: Any) -> str:
    return server.url.replace("http://", "ws://") + "/v1/ws"


async def raw_exchange(server: Any, frames: list[bytes | str]) -> list[dict[str, Any]]:
    """Send raw frames on one connection; one reply per frame."""
    async with websockets.connect(ws_url(server)) as ws:
        replies = []
        for frame in frames:
            await ws.send(frame)
            replies.append(msgpack.unpackb(await asyncio.wait_for(ws.recv(), 10)))
        return replies


def frame(**fields: Any) -> bytes:
    return msgpack.packb(fields)  # type: ignore[no-any-return]


def hello(key: str | None = API_KEY) -> bytes:
    return frame(type="hello", id=0, version=1, api_key=key)


def test_bad_frames_get_errors_and_the_session_goes_on(server: Any) -> None:
    replies = asyncio.run(raw_exchange(server, [
        b"\xc1\xc1 not msgpack",          # malformed MessagePack
        frame(type="list", id=1),          # before hello
        msgpack.packb([1, 2, 3]),          # not a map
        frame(id=2),                       # no type
        frame(type="hello", id=4, version=99, api_key=API_KEY),
        hello(),
        frame(type="teleport", id=5),      # unknown message type
        frame(type="launch", id=6, program="0" * 64),
        frame(type="launch", id=7),        # missing field
        frame(type="message", id=8, instance="nope", text="hi"),
        frame(type="upload_chunk", id=9, hash="a" * 64, data=b"x"),
        frame(type="upload_start", id=10, hash="a" * 64, size=10**12),
        frame(type="upload_start", id=11, hash="BAD", size=1),
        frame(type="list", id=12),
    ]))  # fmt: skip
    codes = [r.get("code") if r["type"] == "error" else "ok" for r in replies]
    assert codes == [
        "bad_frame", "unauthenticated", "bad_frame", "bad_frame",
        "unsupported_version", "ok", "unknown_type", "unknown_program",
        "bad_request", "unknown_instance", "no_upload", "too_large", "bad_request", "ok",
    ]  # fmt: skip
    assert [r["id"] for r in replies[4:]] == [4, 0, 5, 6, 7, 8, 9, 10, 11, 12]
    assert all(r["message"] for r in replies if r["type"] == "error")
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


@pytest.mark.parametrize("key", ["wrong-key", None])
def test_a_failed_hello_closes_the_connection(server: Any, key: str | None) -> None:
    # No second guess on the same socket: a client with a wrong key reconnects.
    async def exchange() -> tuple[dict[str, Any], int | None]:
        async with websockets.connect(ws_url(server)) as ws:
            await ws.send(hello(key) if key else frame(type="hello", id=3))
            reply = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 10))
            with pytest.raises(websockets.ConnectionClosed):
                await ws.send(hello())
                await asyncio.wait_for(ws.recv(), 10)
            return reply, ws.close_code

    reply, code = asyncio.run(exchange())
    assert reply["code"] == "unauthenticated" and code == 1008


def test_uploads_are_checked_against_size_and_hash(server: Any) -> None:
    data = b"\0asm\x01\0\0\0"  # an empty core module: a valid program
    right = hashlib.sha256(data).hexdigest()
    wrong = hashlib.sha256(b"other").hexdigest()
    replies = asyncio.run(raw_exchange(server, [
        hello(),
        frame(type="upload_start", id=1, hash=wrong, size=len(data)),
        frame(type="upload_chunk", id=2, hash=wrong, data=data),
        frame(type="upload_end", id=3, hash=wrong),           # hash mismatch
        frame(type="query_program", id=4, hash=wrong),
        frame(type="upload_start", id=5, hash=right, size=4),
        frame(type="upload_chunk", id=6, hash=right, data=data),  # over the announced size
        frame(type="upload_start", id=7, hash=right, size=len(data)),
        frame(type="upload_chunk", id=8, hash=right, data=data[:3]),
        frame(type="upload_chunk", id=9, hash=right, data=data[3:]),
        frame(type="upload_end", id=10, hash=right),
        frame(type="query_program", id=11, hash=right),
        frame(type="upload_start", id=12, hash=wrong, size=3),
        frame(type="upload_chunk", id=13, hash=wrong, data=b"abc"),
        frame(type="upload_end", id=14, hash=wrong),
    ]))  # fmt: skip
    codes = [r.get("code") if r["type"] == "error" else "ok" for r in replies]
    assert codes == ["ok", "ok", "ok", "hash_mismatch", "ok", "ok", "too_large", "ok", "ok",
                     "ok", "ok", "ok", "ok", "ok", "hash_mismatch"]  # fmt: skip
    assert replies[4]["exists"] is False and replies[11]["exists"] is True
    assert replies[10]["program"] == right


def test_an_upload_over_the_cap_is_refused(server: Any) -> None:
    cap = server.state.config.server.max_upload_mb << 20
    (ok, r) = asyncio.run(raw_exchange(server, [
        hello(), frame(type="upload_start", id=1, hash="b" * 64, size=cap + 1),
    ]))  # fmt: skip
    assert ok["type"] == "ok" and r["code"] == "too_large"


def test_a_garbage_program_is_refused(server: Any) -> None:
    data = b"definitely not wasm"
    digest = hashlib.sha256(data).hexdigest()
    replies = asyncio.run(raw_exchange(server, [
        hello(),
        frame(type="upload_start", id=1, hash=digest, size=len(data)),
        frame(type="upload_chunk", id=2, hash=digest, data=data),
        frame(type="upload_end", id=3, hash=digest),
    ]))  # fmt: skip
    assert replies[-1]["code"] == "bad_program"


def test_client_runs_messages_logs_errors_and_attach(server: Any, sdkkit_wasm: bytes) -> None:
    async def scenario() -> None:
        async with await Client.connect(server.url, API_KEY) as c:
            program = await c.upload(sdkkit_wasm)
            assert await c.has_program(program)
            assert await c.upload(sdkkit_wasm) == program  # already there: no second upload

            echo = await c.launch(program, ["echo"])
            assert await echo.recv() == "ready"
            await echo.send("hello")
            assert await echo.recv() == "echo:hello"  # main's return value
            assert (await echo.wait()).ok
            with pytest.raises(ClientError, match="not_running"):
                await echo.send("too late")

            misc = await c.launch(program, ["misc"])
            events = [e async for e in misc.events()]
            kinds = [e["event"] for e in events]
            assert kinds == ["log", "message", "result"]
            assert events[0]["data"] == {"level": "info", "text": "misc scenario ran"}

            fail = await c.launch(program, ["fail"])
            status = await fail.wait()
            assert status.kind == "error" and "boom from the app" in (status.error or "")

            waiting = await c.launch(program, ["echo"])
            assert await waiting.recv() == "ready"
            listed = {r["id"]: r for r in await c.list()}
            assert listed[waiting.id]["status"] == "running"
            # A second client attaches, sees the backlog, and terminates it.
            async with await Client.connect(server.url, API_KEY) as other:
                seen = await other.attach(waiting.id)
                assert await seen.recv() == "ready"
                await seen.terminate()
                assert (await seen.wait()).kind == "terminated"
            status = await waiting.wait()
            assert status.kind == "terminated" and not status.ok
            assert waiting.id not in {r["id"] for r in await c.list()}

    asyncio.run(scenario())


def test_sync_client(server: Any, sdkkit_wasm: bytes) -> None:
    with SyncClient(server.url, API_KEY) as c:
        inst = c.launch(c.upload(sdkkit_wasm), ["echo"])
        assert inst.recv(timeout=60) == "ready"
        inst.send("sync")
        assert inst.recv(timeout=60) == "echo:sync"
        assert inst.wait(timeout=60).ok


def test_inferlet_run_over_sse(server: Any, sdkkit_wasm: bytes) -> None:
    with SyncClient(server.url, API_KEY) as c:
        program = c.upload(sdkkit_wasm)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream(
        "POST",
        server.url + "/v1/inferlets/run",
        headers=headers,
        timeout=60,
        json={"program": program, "args": ["fast", "Once upon", "5"]},
    ) as r:
        assert r.status_code == 200
        events = []
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
    assert [k for k, _ in events] == ["launched", "message", "result"]
    assert len(json.loads(events[1][1])["tokens"]) > 0
    r = httpx.post(server.url + "/v1/inferlets/run", headers=headers,
                   json={"program": "f" * 64})  # fmt: skip
    assert r.status_code == 404 and "upload" in r.json()["error"]["message"]


def test_two_clients_fifty_instances_each(server: Any, sdkkit_wasm: bytes) -> None:
    from loom import LLM, SamplingParams

    llm = LLM(server.state.config.engine.model, num_pages=64)
    prompts = [f"Story number {i}:" for i in range(10)]
    greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    # The SDK's `fill` adds no special tokens.
    encode = llm.tokenizer.encode
    want = {p: llm.generate([encode(p, add_special_tokens=False)], greedy)[0].token_ids
            for p in prompts}  # fmt: skip

    async def one_client(k: int) -> list[tuple[str, list[int]]]:
        async with await Client.connect(server.url, API_KEY) as c:
            program = await c.upload(sdkkit_wasm)
            jobs = [(prompts[(k * 50 + i) % 10], await c.launch(program, ["steps",
                     prompts[(k * 50 + i) % 10], "4"])) for i in range(50)]  # fmt: skip
            out = []
            for prompt, inst in jobs:
                status = await inst.wait()
                assert status.ok, status.error
                out.append((prompt, json.loads(await inst.recv())))
            return out

    async def both() -> list[list[tuple[str, list[int]]]]:
        return await asyncio.gather(one_client(0), one_client(1))

    results = asyncio.run(both())
    assert sum(len(r) for r in results) == 100
    for prompt, tokens in (x for r in results for x in r):
        assert tokens == want[prompt]
