"""One WebSocket client session of the inferlet protocol (see ``loom.api.protocol``)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
from dataclasses import dataclass
from typing import Any

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
from loom.runtime.wasm.ffi import WasmError
from loom.server.auth import refusal
from loom.server.state import Event, ServerState

logger = logging.getLogger("loom.server")
_session_ids = itertools.count(1)


class _Upload:
    def __init__(self, digest: str, size: int) -> None:
        self.digest, self.size = digest, size
        self.hasher = hashlib.sha256()
        self.parts: list[bytes] = []
        self.received = 0


@dataclass(frozen=True)
class _Close:
    """In the outbox: close the socket after the frames before it."""

    code: int
    reason: str


_AUTH_FAILED = _Close(1008, "authentication failed")


class Session:
    def __init__(self, state: ServerState, ws: WebSocket) -> None:
        self.state = state
        self.ws = ws
        self.id = next(_session_ids)
        self.authenticated = False
        # Frames to send; None ends the sender, a _Close closes the socket after the frames
        # before it (a failed authentication: its error reply goes out first). A client
        # that leaves more than ``client_outbox_mb`` unsent is disconnected.
        self.outbox: asyncio.Queue[bytes | _Close | None] = asyncio.Queue()
        self.outbox_bytes = 0
        self.too_slow = False
        self.uploads: dict[str, _Upload] = {}
        self.attached: set[str] = set()

    async def run(self) -> None:
        await self.ws.accept()
        sender = asyncio.create_task(self._send_loop())
        try:
            async for data in incoming(self.ws):
                await self._handle(data)
        finally:
            for iid in list(self.attached):
                self._detach(iid)
            self.outbox.put_nowait(None)
            with contextlib.suppress(Exception):
                await sender

    async def _send_loop(self) -> None:
        while True:
            frame = await self.outbox.get()
            if frame is None:
                return
            try:
                if isinstance(frame, _Close):
                    await self.ws.close(code=frame.code, reason=frame.reason)
                    return
                self.outbox_bytes -= len(frame)
                await self.ws.send_bytes(frame)
            except Exception:  # the client is gone; the receive side ends the session
                return

    def _send(self, frame: dict[str, Any]) -> None:
        data = pack(frame)
        self.outbox_bytes += len(data)
        self.outbox.put_nowait(data)

    async def _handle(self, data: bytes) -> None:
        corr: Any = None
        kind: Any = None
        try:
            if len(data) > MAX_FRAME:
                raise ProtocolError(Code.TOO_LARGE, f"frame over {MAX_FRAME} bytes")
            frame = unpack(data)
            corr = frame.get("id")
            kind = frame["type"]
            handler = _HANDLERS.get(kind)
            if handler is None:
                raise ProtocolError(Code.UNKNOWN_TYPE, f"unknown message type {kind!r}")
            if kind != "hello" and not self.authenticated:
                raise ProtocolError(Code.UNAUTHENTICATED, "send 'hello' (with an API key) first")
            reply = await handler(self, frame)
            self._send({"type": "ok", "id": corr, **(reply or {})})
        except ProtocolError as e:
            self._send({"type": "error", "id": corr, "code": e.code, "message": e.message})
            if e.code == Code.UNAUTHENTICATED and kind == "hello":
                # A wrong key ends the connection: no second guess on the same socket.
                self.outbox.put_nowait(_AUTH_FAILED)
        except Exception as e:  # a bug must not end the session or the server
            logger.exception("protocol handler failed")
            self._send({"type": "error", "id": corr, "code": "internal", "message": str(e)})

    # ----- requests -----

    async def hello(self, frame: dict[str, Any]) -> dict[str, Any]:
        version = field(frame, "version", int, PROTOCOL_VERSION)
        if version != PROTOCOL_VERSION:
            raise ProtocolError(
                Code.VERSION, f"protocol version {version} is not supported (server speaks 1)"
            )
        key = field(frame, "api_key", (str, type(None)), None)
        if self.state.config.server.api_keys:
            client = self.ws.client
            address = client.host if client else ""
            wait_s = self.state.auth_limit.wait_s(address)
            if wait_s:
                raise ProtocolError(Code.UNAUTHENTICATED, refusal(wait_s))
            if not self.state.check_key(key):
                self.state.auth_limit.failed(address)
                raise ProtocolError(Code.UNAUTHENTICATED, "missing or wrong API key")
        self.authenticated = True
        return {"version": PROTOCOL_VERSION, "server": f"loom {__version__}",
                "model": self.state.model_name}  # fmt: skip

    async def query_program(self, frame: dict[str, Any]) -> dict[str, Any]:
        digest = _hash_field(frame)
        exists = await asyncio.to_thread(self.state.has_program, digest)
        return {"exists": exists}

    async def upload_start(self, frame: dict[str, Any]) -> dict[str, Any]:
        digest = _hash_field(frame)
        size = field(frame, "size", int)
        cap = self.state.config.server.max_upload_mb << 20
        if not 0 < size <= cap:
            raise ProtocolError(Code.TOO_LARGE, f"program size must be 1..{cap} bytes")
        self.uploads[digest] = _Upload(digest, size)
        return {"chunk_size": CHUNK_SIZE}

    async def upload_chunk(self, frame: dict[str, Any]) -> dict[str, Any]:
        up = self._upload(frame)
        data = field(frame, "data", bytes)
        if up.received + len(data) > up.size:
            del self.uploads[up.digest]
            raise ProtocolError(
                Code.TOO_LARGE, f"more bytes than the announced size of {up.size}; upload dropped"
            )
        up.hasher.update(data)
        up.parts.append(data)
        up.received += len(data)
        return {"received": up.received}

    async def upload_end(self, frame: dict[str, Any]) -> dict[str, Any]:
        up = self._upload(frame)
        del self.uploads[up.digest]
        if up.received != up.size:
            raise ProtocolError(
                Code.BAD_REQUEST, f"received {up.received} of {up.size} bytes; upload dropped"
            )
        actual = up.hasher.hexdigest()
        if actual != up.digest:
            raise ProtocolError(
                Code.HASH_MISMATCH, f"the data hashes to {actual}, not {up.digest}; upload dropped"
            )
        try:
            digest = await asyncio.to_thread(self.state.save_program, b"".join(up.parts))
        except WasmError as e:
            raise ProtocolError(Code.BAD_PROGRAM, f"not a loadable program: {e}") from None
        return {"program": digest}

    async def launch(self, frame: dict[str, Any]) -> dict[str, Any]:
        digest = field(frame, "program", str)
        args = field(frame, "args", list, [])
        if not all(isinstance(a, str) for a in args):
            raise ProtocolError(Code.BAD_REQUEST, "launch: 'args' must be a list of strings")
        if not await asyncio.to_thread(self.state.has_program, digest):
            raise ProtocolError(Code.UNKNOWN_PROGRAM, f"no program with hash {digest}; upload it")
        if len(self.state.instances) >= self.state.config.runtime.max_instances:
            raise ProtocolError(Code.BUSY, "too many instances; try again later")
        record = self.state.launch(digest, args)
        if field(frame, "attach", bool, True):
            self._attach(record.id, replay=False)
        return {"instance": record.id}

    async def message(self, frame: dict[str, Any]) -> None:
        record = self._record(frame)
        text = field(frame, "text", str)
        if record.status != "running":
            raise ProtocolError(Code.NOT_RUNNING, f"instance {record.id} has {record.status}")
        if len(text.encode()) > self.state.runtime.config.max_message_bytes:
            raise ProtocolError(Code.TOO_LARGE, "message over the server's size cap")
        record.handle.send(text)

    async def terminate(self, frame: dict[str, Any]) -> None:
        record = self._record(frame)
        if record.status != "running":
            raise ProtocolError(Code.NOT_RUNNING, f"instance {record.id} has {record.status}")
        self.state.terminate(record)

    async def attach(self, frame: dict[str, Any]) -> dict[str, Any]:
        record = self._record(frame)
        status = record.status
        self._attach(record.id, replay=True)
        return {"status": status}

    async def detach(self, frame: dict[str, Any]) -> None:
        self._detach(self._record(frame).id)

    async def list_instances(self, frame: dict[str, Any]) -> dict[str, Any]:
        return {"instances": [r.summary() for r in self.state.instances.values()]}

    # ----- helpers -----

    def _upload(self, frame: dict[str, Any]) -> _Upload:
        digest = _hash_field(frame)
        up = self.uploads.get(digest)
        if up is None:
            raise ProtocolError(Code.NO_UPLOAD, f"no upload of {digest} in progress")
        return up

    def _record(self, frame: dict[str, Any]) -> Any:
        iid = field(frame, "instance", str)
        record = self.state.find(iid)
        if record is None:
            raise ProtocolError(Code.UNKNOWN_INSTANCE, f"no instance {iid}")
        return record

    def _attach(self, iid: str, replay: bool) -> None:
        record = self.state.find(iid)
        assert record is not None
        if replay:  # after this reply: the ok frame goes out first
            backlog = list(record.backlog)
            asyncio.get_running_loop().call_soon(self._replay, backlog)
        if record.status == "running":
            record.subscribers[self.id] = self._deliver
            self.attached.add(iid)

    def _replay(self, events: list[Event]) -> None:
        for event in events:
            self._deliver(event)

    def _detach(self, iid: str) -> None:
        self.attached.discard(iid)
        record = self.state.find(iid)
        if record is not None:
            record.subscribers.pop(self.id, None)

    def _deliver(self, event: Event) -> None:
        if self.too_slow:
            return
        cap = self.state.config.server.client_outbox_mb
        if self.outbox_bytes > cap << 20:
            # It does not read what it asked for: let it go rather than hold the events
            # (it may attach again and replay the instance's backlog).
            self.too_slow = True
            for iid in list(self.attached):
                self._detach(iid)
            while not self.outbox.empty():  # what it did not read goes (it ends the sender)
                self.outbox.get_nowait()
            self.outbox_bytes = 0
            self._send({"type": "error", "id": None, "code": Code.TOO_SLOW,
                        "message": f"over {cap} MiB of events unread: disconnected"})  # fmt: skip
            self.outbox.put_nowait(_Close(1008, "client too slow"))
            return
        self._send(event)
        if event["event"] in ("result", "error", "terminated"):
            self._detach(event["instance"])


def _hash_field(frame: dict[str, Any]) -> str:
    digest: str = field(frame, "hash", str)
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ProtocolError(Code.BAD_REQUEST, "'hash' must be a sha256 in lowercase hex")
    return digest


_HANDLERS = {
    "hello": Session.hello,
    "query_program": Session.query_program,
    "upload_start": Session.upload_start,
    "upload_chunk": Session.upload_chunk,
    "upload_end": Session.upload_end,
    "launch": Session.launch,
    "message": Session.message,
    "terminate": Session.terminate,
    "attach": Session.attach,
    "detach": Session.detach,
    "list": Session.list_instances,
}
