"""The inferlet client protocol: MessagePack maps over a WebSocket (``/v1/ws``).

Version 1. Every client frame is a map with ``type`` and a correlation ``id`` (chosen by
the client, echoed back). The server answers each request with exactly one frame:
``{"type": "ok", "id", ...fields}`` or ``{"type": "error", "id", "code", "message"}``.
Instance events arrive unprompted as ``{"type": "event", "instance", "event", "data"}``
where ``event`` is one of ``message`` (data: text), ``log`` (data: {level, text}) and,
last, exactly one of ``result`` (the instance returned), ``error`` (it failed: data
{message}) or ``terminated`` (a client ended it: data {reason}).

Requests (fields besides ``type`` and ``id``):

=================  =============================================  ==========================
type               fields                                         ok answer
=================  =============================================  ==========================
hello              version, api_key (when the server has keys)    version, server, model
query_program      hash                                           exists
upload_start       hash, size                                     chunk_size
upload_chunk       hash, data (bytes, in order)                   received
upload_end         hash                                           program
launch             program, args, attach (default true)           instance
message            instance, text                                 —
terminate          instance                                       —
attach             instance                                       status (backlog follows)
detach             instance                                       —
list               —                                              instances
=================  =============================================  ==========================

``hello`` must come first. Uploads are checked against the announced size and sha256.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgpack
from fastapi import WebSocket, WebSocketDisconnect

PROTOCOL_VERSION = 1
CHUNK_SIZE = 256 << 10  # what the server suggests; any chunk size up to MAX_FRAME works
MAX_FRAME = 4 << 20


class Code:
    """Error codes (stable strings; the message says what happened in words)."""

    BAD_FRAME = "bad_frame"  # not MessagePack, not a map, or no type
    UNKNOWN_TYPE = "unknown_type"
    BAD_REQUEST = "bad_request"  # a missing or mistyped field
    VERSION = "unsupported_version"
    UNAUTHENTICATED = "unauthenticated"  # hello missing, or a wrong/missing API key
    TOO_LARGE = "too_large"
    HASH_MISMATCH = "hash_mismatch"
    NO_UPLOAD = "no_upload"  # a chunk or end without a started upload
    BAD_PROGRAM = "bad_program"  # not a WebAssembly component/module
    UNKNOWN_PROGRAM = "unknown_program"
    UNKNOWN_INSTANCE = "unknown_instance"
    NOT_RUNNING = "not_running"  # a message to an instance that has ended
    BUSY = "busy"  # too many instances
    TOO_SLOW = "too_slow"  # a client that leaves too many events unread


class ProtocolError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


async def incoming(ws: WebSocket) -> AsyncIterator[bytes]:
    """The frames a client sends over ``ws`` (text frames as their UTF-8 bytes), until it
    disconnects."""
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            if data is None:
                text = message.get("text")
                data = text.encode() if text is not None else b""
            yield data
    except WebSocketDisconnect:
        return


def pack(frame: dict[str, Any]) -> bytes:
    return msgpack.packb(frame, use_bin_type=True)  # type: ignore[no-any-return]


def unpack(data: bytes) -> dict[str, Any]:
    """A client frame as a map with a string ``type``; ``ProtocolError`` otherwise."""
    try:
        frame = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(Code.BAD_FRAME, f"not a MessagePack frame: {e}") from None
    if not isinstance(frame, dict):
        raise ProtocolError(Code.BAD_FRAME, "a frame must be a map")
    if not isinstance(frame.get("type"), str):
        raise ProtocolError(Code.BAD_FRAME, "a frame needs a string 'type'")
    return frame


def field(
    frame: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ...
) -> Any:
    """A request field of the given type (``BAD_REQUEST`` when missing or mistyped)."""
    if name not in frame:
        if default is ...:
            raise ProtocolError(Code.BAD_REQUEST, f"{frame['type']}: missing field {name!r}")
        return default
    value = frame[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ProtocolError(Code.BAD_REQUEST, f"{frame['type']}: field {name!r} must be {names}")
    return value
