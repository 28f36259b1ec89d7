"""The inferlet protocol (``/v1/ws``, ``loom.api.protocol``) through the router, so that
``loom run --server ROUTER`` and the client library work against a fleet of replicas.

The router answers ``hello``, ``query_program`` and uploads itself: an upload ends with
the program kept (``ProgramStore``) and put on every live replica. A ``launch`` goes to
the least-loaded replica (the program is put there first if it joined or restarted
since). Instances are named ``<replica index>-<its id there>`` towards the client, so
``message``, ``terminate``, ``attach`` and ``detach`` reach the replica that runs them,
from any connection; ``list`` gathers every replica's. Each session holds one protocol
connection per replica it used, and relays their events.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
from typing import Any

import msgpack
import websockets
from fastapi import WebSocket

from loom import __version__
from loom.api.protocol import (
    CHUNK_SIZE,
    MAX_FRAME,
    PROTOCOL_VERSION,
    Code,
    ProtocolError,
    field,
    incoming,
    pack,
    unpack,
)
from loom.client.client import ws_url
from loom.router.fleet import Engine
from loom.router.inferlets_api import MAX_PROGRAM_BYTES, ProgramStore
from loom.router.router import Preempted, Router

_FINAL = ("result", "error", "terminated")


class _Upstream:
    """One protocol connection of a session to one replica."""

    def __init__(self, engine: Engine, ws: Any, session: ProxySession) -> None:
        self.engine, self.ws, self.session = engine, ws, session
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.reader = asyncio.create_task(self._read())

    async def request(self, frame: dict[str, Any]) -> dict[str, Any]:
        """Send ``frame``; the replica's answer (an ``ok`` map, else ``ProtocolError``)."""
        rid = next(self.ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[rid] = fut
        try:
            await self.ws.send(pack({**frame, "id": rid}))
        except Exception as e:
            self.pending.pop(rid, None)
            raise ProtocolError("unavailable", f"replica {self.engine.url}: {e}") from None
        reply = await fut
        if reply.get("type") == "error":
            raise ProtocolError(str(reply.get("code")), str(reply.get("message")))
        return {k: v for k, v in reply.items() if k not in ("type", "id")}

    async def _read(self) -> None:
        why = "the connection closed"
        try:
            async for data in self.ws:
                frame = msgpack.unpackb(data, raw=False, strict_map_key=False)
                if frame.get("type") == "event":
                    self.session.relay(self, frame)
                else:
                    fut = self.pending.pop(int(frame.get("id") or 0), None)
                    if fut is not None and not fut.done():
                        fut.set_result(frame)
        except Exception as e:
            why = str(e) or type(e).__name__
        for fut in self.pending.values():
            if not fut.done():
                fut.set_result({"type": "error", "code": "unavailable",
                                "message": f"replica {self.engine.url} lost: {why}"})  # fmt: skip
        self.session.lost(self, why)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
        self.reader.cancel()
        with contextlib.suppress(BaseException):
            await self.reader


class ProxySession:
    """One client connection to the router's ``/v1/ws``."""

    def __init__(self, ws: WebSocket, router: Router, store: ProgramStore,
                 api_keys: tuple[str, ...], model_name: str) -> None:  # fmt: skip
        self.ws, self.router, self.store = ws, router, store
        self.api_keys, self.model_name = api_keys, model_name
        self.authenticated = not api_keys
        self.upstreams: dict[int, _Upstream] = {}
        self.uploads: dict[str, tuple[int, bytearray]] = {}
        self.launched: dict[str, Engine] = {}  # this session's running launches: their load
        self.outbox: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def run(self) -> None:
        await self.ws.accept()
        sender = asyncio.create_task(self._send_loop())
        try:
            async for data in incoming(self.ws):
                await self._handle(data)
        finally:
            for engine in self.launched.values():  # their instances run on, unwatched
                engine.running -= 1
            self.launched.clear()
            for up in list(self.upstreams.values()):
                await up.close()
            self.outbox.put_nowait(None)
            with contextlib.suppress(Exception):
                await sender

    async def _send_loop(self) -> None:
        while (data := await self.outbox.get()) is not None:
            try:
                await self.ws.send_bytes(data)
            except Exception:
                return

    def send(self, frame: dict[str, Any]) -> None:
        self.outbox.put_nowait(pack(frame))

    async def _handle(self, data: bytes) -> None:
        corr: Any = None
        try:
            if len(data) > MAX_FRAME:
                raise ProtocolError(Code.TOO_LARGE, f"frame over {MAX_FRAME} bytes")
            frame = unpack(data)
            corr, kind = frame.get("id"), frame["type"]
            handler = getattr(self, f"on_{kind}", None)
            if handler is None:
                raise ProtocolError(Code.UNKNOWN_TYPE, f"unknown message type {kind!r}")
            if kind != "hello" and not self.authenticated:
                raise ProtocolError(Code.UNAUTHENTICATED, "send 'hello' (with an API key) first")
            self.send({"type": "ok", "id": corr, **(await handler(frame) or {})})
        except ProtocolError as e:
            self.send({"type": "error", "id": corr, "code": e.code, "message": e.message})

    # ----- what the router answers itself -----

    async def on_hello(self, frame: dict[str, Any]) -> dict[str, Any]:
        if field(frame, "version", int, PROTOCOL_VERSION) != PROTOCOL_VERSION:
            raise ProtocolError(Code.VERSION, "protocol version not supported (router speaks 1)")
        key = field(frame, "api_key", (str, type(None)), None) or ""
        if self.api_keys and not any(hmac.compare_digest(key.encode(), k.encode())
                                     for k in self.api_keys):  # fmt: skip
            raise ProtocolError(Code.UNAUTHENTICATED, "missing or wrong API key")
        self.authenticated = True
        return {"version": PROTOCOL_VERSION, "server": f"loom router {__version__}",
                "model": self.model_name}  # fmt: skip

    async def on_query_program(self, frame: dict[str, Any]) -> dict[str, Any]:
        return {"exists": field(frame, "hash", str) in self.store.programs}

    async def on_upload_start(self, frame: dict[str, Any]) -> dict[str, Any]:
        size = field(frame, "size", int)
        if not 0 < size <= MAX_PROGRAM_BYTES:
            raise ProtocolError(Code.TOO_LARGE, f"program size must be 1..{MAX_PROGRAM_BYTES}")
        self.uploads[field(frame, "hash", str)] = (size, bytearray())
        return {"chunk_size": CHUNK_SIZE}

    async def on_upload_chunk(self, frame: dict[str, Any]) -> dict[str, Any]:
        size, data = self._upload(frame)
        data += field(frame, "data", bytes)
        if len(data) > size:
            del self.uploads[frame["hash"]]
            raise ProtocolError(Code.TOO_LARGE, f"more than the announced {size} bytes")
        return {"received": len(data)}

    async def on_upload_end(self, frame: dict[str, Any]) -> dict[str, Any]:
        size, data = self._upload(frame)
        digest = frame["hash"]
        del self.uploads[digest]
        if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
            raise ProtocolError(Code.HASH_MISMATCH, "the data is not the announced program")
        try:
            await self.store.publish(self.router, bytes(data))
        except ValueError as e:
            raise ProtocolError(Code.BAD_PROGRAM, str(e)) from None
        return {"program": digest}

    def _upload(self, frame: dict[str, Any]) -> tuple[int, bytearray]:
        up = self.uploads.get(field(frame, "hash", str))
        if up is None:
            raise ProtocolError(Code.NO_UPLOAD, "no upload of that program in progress")
        return up

    # ----- what goes to a replica -----

    async def on_launch(self, frame: dict[str, Any]) -> dict[str, Any]:
        digest = field(frame, "program", str)
        if digest not in self.store.programs:
            raise ProtocolError(Code.UNKNOWN_PROGRAM, f"no program with hash {digest}; upload it")
        try:
            engine = self.router.least_loaded()
        except Preempted:
            raise ProtocolError(Code.BUSY, "no replica is up; try again later") from None
        engine.running += 1  # now: launches at once must not all pick the same one
        try:
            up = await self._upstream(engine)
            request = {k: v for k, v in frame.items() if k != "id"}
            try:
                reply = await up.request(request)
            except ProtocolError as e:
                if e.code != Code.UNKNOWN_PROGRAM:  # else: it joined or restarted since
                    raise
                await self.store.put_on(engine, digest)
                reply = await up.request(request)
        except BaseException:
            engine.running -= 1
            raise
        iid = f"{engine.index}-{reply['instance']}"
        self.launched[iid] = engine
        return {"instance": iid}

    async def on_message(self, frame: dict[str, Any]) -> dict[str, Any]:
        return await self._forward(frame)

    async def on_terminate(self, frame: dict[str, Any]) -> dict[str, Any]:
        return await self._forward(frame)

    async def on_attach(self, frame: dict[str, Any]) -> dict[str, Any]:
        return await self._forward(frame)

    async def on_detach(self, frame: dict[str, Any]) -> dict[str, Any]:
        return await self._forward(frame)

    async def on_list(self, frame: dict[str, Any]) -> dict[str, Any]:
        found: list[dict[str, Any]] = []
        for engine in self.router.live_engines():
            up = await self._upstream(engine)
            for inst in (await up.request({"type": "list"}))["instances"]:
                found.append({**inst, "id": f"{engine.index}-{inst['id']}"})
        return {"instances": found}

    async def _forward(self, frame: dict[str, Any]) -> dict[str, Any]:
        iid = field(frame, "instance", str)
        index, _, inner = iid.partition("-")
        engine = self.router.engine(int(index)) if index.isdigit() else None
        if engine is None or not inner:
            raise ProtocolError(Code.UNKNOWN_INSTANCE, f"no instance {iid}")
        up = await self._upstream(engine)
        request = {k: v for k, v in frame.items() if k != "id"}
        return await up.request({**request, "instance": inner})

    async def _upstream(self, engine: Engine) -> _Upstream:
        up = self.upstreams.get(engine.index)
        if up is not None and not up.reader.done():
            return up
        try:
            ws = await websockets.connect(ws_url(engine.url), max_size=2 * MAX_FRAME)
        except Exception as e:
            raise ProtocolError("unavailable", f"replica {engine.url}: {e}") from None
        up = self.upstreams[engine.index] = _Upstream(engine, ws, self)
        await up.request({"type": "hello", "version": PROTOCOL_VERSION,
                          "api_key": self.store.api_key})  # fmt: skip
        return up

    # ----- events from replicas -----

    def relay(self, up: _Upstream, frame: dict[str, Any]) -> None:
        iid = f"{up.engine.index}-{frame.get('instance')}"
        self.send({**frame, "instance": iid})
        if frame.get("event") in _FINAL and iid in self.launched:
            self.launched.pop(iid).running -= 1

    def lost(self, up: _Upstream, why: str) -> None:
        """A replica's connection ended: this session's instances there end with an error
        (an instance's state lives in its replica; it cannot be moved or rerun)."""
        prefix = f"{up.engine.index}-"
        for iid in [i for i in self.launched if i.startswith(prefix)]:
            self.launched.pop(iid).running -= 1
            self.send({"type": "event", "instance": iid, "event": "error",
                       "data": {"message": f"replica {up.engine.url} lost: {why}"}})  # fmt: skip
