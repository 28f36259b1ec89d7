"""The asyncio client of the inferlet protocol (``loom.api.protocol``)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
import websockets

PROTOCOL_VERSION = 1
_FINAL = ("result", "error", "terminated")


class ClientError(Exception):
    """The server refused a request: ``code`` is the protocol's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass
class InstanceStatus:
    """How an instance ended: ``kind`` is ``result``, ``error`` or ``terminated``."""

    instance: str
    kind: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.kind == "result"

    @property
    def error(self) -> str | None:
        if self.kind == "error":
            return str(self.data.get("message", ""))
        if self.kind == "terminated":
            return str(self.data.get("reason", "terminated"))
        return None


class Instance:
    """A launched (or attached) instance. ``recv`` returns its next message; ``events``
    yields everything (messages, logs, the end) in order."""

    def __init__(self, client: Client, instance_id: str) -> None:
        self.client = client
        self.id = instance_id
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._messages: asyncio.Queue[str | None] = asyncio.Queue()
        self._end: asyncio.Future[InstanceStatus] = asyncio.get_running_loop().create_future()

    def _on_event(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        self._events.put_nowait(event)
        if kind == "message":
            self._messages.put_nowait(event["data"])
        elif kind in _FINAL and not self._end.done():
            data = event["data"] if isinstance(event["data"], dict) else {}
            self._end.set_result(InstanceStatus(self.id, kind, data))
            self._messages.put_nowait(None)

    async def send(self, text: str) -> None:
        await self.client._request("message", instance=self.id, text=text)

    async def recv(self) -> str:
        """The next message; ``EOFError`` once the instance has ended and none is left."""
        msg = await self._messages.get()
        if msg is None:
            self._messages.put_nowait(None)  # keep answering EOF
            raise EOFError(f"instance {self.id} has ended")
        return msg

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Every event as ``{"event": kind, "data": ...}``, the final one included."""
        while True:
            event = await self._events.get()
            yield event
            if event["event"] in _FINAL:
                return

    async def wait(self) -> InstanceStatus:
        return await asyncio.shield(self._end)

    async def terminate(self) -> None:
        await self.client._request("terminate", instance=self.id)

    @property
    def done(self) -> bool:
        return self._end.done()


class Client:
    """``async with await Client.connect("http://127.0.0.1:8080", api_key=...) as c:``"""

    def __init__(self, ws: Any, info: dict[str, Any] | None = None) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._instances: dict[str, Instance] = {}
        self._early: dict[str, list[dict[str, Any]]] = {}  # events before the launch reply
        self._reader = asyncio.create_task(self._read())
        self.info = info or {}

    @classmethod
    async def connect(cls, url: str, api_key: str | None = None) -> Client:
        ws = await websockets.connect(ws_url(url), max_size=16 << 20)
        client = cls(ws)
        try:
            client.info = await client._request("hello", version=PROTOCOL_VERSION, api_key=api_key)
        except BaseException:
            await client.close()
            raise
        return client

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._ws.close()
        self._reader.cancel()
        with contextlib.suppress(BaseException):
            await self._reader

    # ----- programs -----

    async def has_program(self, digest: str) -> bool:
        return bool((await self._request("query_program", hash=digest))["exists"])

    async def upload(self, wasm: bytes) -> str:
        """Upload a program unless the server has it; returns its hash."""
        digest = hashlib.sha256(wasm).hexdigest()
        if await self.has_program(digest):
            return digest
        reply = await self._request("upload_start", hash=digest, size=len(wasm))
        step = int(reply.get("chunk_size", 256 << 10))
        for at in range(0, len(wasm), step):
            await self._request("upload_chunk", hash=digest, data=wasm[at : at + step])
        reply = await self._request("upload_end", hash=digest)
        return str(reply["program"])

    # ----- instances -----

    async def launch(self, program: str, args: list[str] | None = None) -> Instance:
        reply = await self._request("launch", program=program, args=list(args or []))
        return self._instance(str(reply["instance"]))

    async def attach(self, instance_id: str) -> Instance:
        inst = self._instance(instance_id)
        await self._request("attach", instance=instance_id)
        return inst

    async def list(self) -> list[dict[str, Any]]:
        return list((await self._request("list"))["instances"])

    async def terminate(self, instance_id: str) -> None:
        await self._request("terminate", instance=instance_id)

    def _instance(self, iid: str) -> Instance:
        inst = self._instances.get(iid)
        if inst is None:
            inst = self._instances[iid] = Instance(self, iid)
            for event in self._early.pop(iid, []):
                inst._on_event(event)
        return inst

    # ----- wire -----

    async def _request(self, kind: str, **fields: Any) -> dict[str, Any]:
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        frame = {"type": kind, "id": rid, **{k: v for k, v in fields.items() if v is not None}}
        await self._ws.send(msgpack.packb(frame, use_bin_type=True))
        reply = await fut
        if reply.get("type") == "error":
            raise ClientError(str(reply.get("code")), str(reply.get("message")))
        return reply

    async def _read(self) -> None:
        error: BaseException = ConnectionError("the connection closed")
        try:
            async for data in self._ws:
                frame: dict[str, Any] = (
                    msgpack.unpackb(data, raw=False) if isinstance(data, bytes) else {}
                )
                kind = frame.get("type")
                if kind == "event":
                    iid = str(frame.get("instance"))
                    inst = self._instances.get(iid)
                    if inst is not None:
                        inst._on_event(frame)
                    else:
                        self._early.setdefault(iid, []).append(frame)
                elif kind in ("ok", "error"):
                    fut = self._pending.pop(int(frame.get("id") or 0), None)
                    if fut is not None and not fut.done():
                        fut.set_result(frame)
        except Exception as e:
            error = e
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionError(f"connection lost: {error}"))
            self._pending.clear()


def ws_url(url: str) -> str:
    """``http://host:port`` (or ``ws://…``) → the protocol endpoint ``ws://host:port/v1/ws``."""
    if url.startswith("http://"):
        url = "ws://" + url[len("http://") :]
    elif url.startswith("https://"):
        url = "wss://" + url[len("https://") :]
    elif not url.startswith(("ws://", "wss://")):
        url = "ws://" + url
    url = url.rstrip("/")
    return url if url.endswith("/v1/ws") else url + "/v1/ws"
