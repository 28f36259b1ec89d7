"""How a frame's K/V bytes travel, behind one interface: ``tcp`` (on the socket, after the
header), ``shm`` (in a shared-memory segment; the header names it; engines on one host)
and ``gloo`` (``torch.distributed`` send/recv in a two-process gloo group set up over the
socket; the header carries only the shape). ``TRANSPORTS`` is the registry by name.

The sending side is chosen by the engine's setting (``kv_transport``; ``auto`` is shm to a
receiver on this host and tcp to any other: ``for_destination``); a receiver takes any of
them, each frame's header saying which (``Transport.claims``).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from loom.engine.kv_transfer.wire import join_gloo, open_gloo, put_shm, send_frame, take_shm


@dataclass
class Channel:
    """One connection's transport state, on either side (a gloo group once set up)."""

    sock: socket.socket
    group: Any = None  # sender: (group, its store); receiver: the group
    tag: int = 0


class Transport(Protocol):
    name: str

    def send(self, ch: Channel, meta: dict[str, Any], kv: torch.Tensor) -> int:
        """Send one frame (header ``meta``, data ``kv``); the bytes of K/V it carried."""
        ...

    def claims(self, header: dict[str, Any]) -> bool:
        """Whether a received frame came by this transport."""
        ...

    def take(
        self, ch: Channel, header: dict[str, Any], payload: bytes, like: torch.Tensor | None
    ) -> tuple[bytes, torch.Tensor | None]:
        """The frame's data (bytes, or a tensor shaped as ``like``) off its channel."""
        ...


def _raw(kv: torch.Tensor) -> bytes:
    return kv.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()


class TcpTransport:
    name = "tcp"

    def send(self, ch: Channel, meta: dict[str, Any], kv: torch.Tensor) -> int:
        data = _raw(kv)
        send_frame(ch.sock, meta, data)
        return len(data)

    def claims(self, header: dict[str, Any]) -> bool:
        return "shm" not in header and not header.get("gloo")

    def take(
        self, ch: Channel, header: dict[str, Any], payload: bytes, like: torch.Tensor | None
    ) -> tuple[bytes, torch.Tensor | None]:
        return payload, None


class ShmTransport:
    name = "shm"

    def send(self, ch: Channel, meta: dict[str, Any], kv: torch.Tensor) -> int:
        data = _raw(kv)
        send_frame(ch.sock, {**meta, "shm": put_shm(data), "nbytes": len(data)})
        return len(data)

    def claims(self, header: dict[str, Any]) -> bool:
        return "shm" in header

    def take(
        self, ch: Channel, header: dict[str, Any], payload: bytes, like: torch.Tensor | None
    ) -> tuple[bytes, torch.Tensor | None]:
        return take_shm(str(header["shm"]), int(header["nbytes"])), None


class GlooTransport:
    name = "gloo"

    def send(self, ch: Channel, meta: dict[str, Any], kv: torch.Tensor) -> int:
        if ch.group is None:
            ch.group = open_gloo(ch.sock)  # (the receiver joins on the handshake frame)
        ch.tag += 1
        send_frame(ch.sock, {**meta, "gloo": True, "tag": ch.tag})
        tensor = kv.detach().contiguous().cpu()
        ch.group[0].send([tensor], 1, ch.tag).wait()
        return tensor.numel() * tensor.element_size()

    def claims(self, header: dict[str, Any]) -> bool:
        return bool(header.get("gloo"))

    def take(
        self, ch: Channel, header: dict[str, Any], payload: bytes, like: torch.Tensor | None
    ) -> tuple[bytes, torch.Tensor | None]:
        if ch.group is None:
            raise ValueError("a gloo frame before the gloo handshake")
        assert like is not None
        ch.group.recv([like], 0, int(header["tag"])).wait()
        return b"", like

    @staticmethod
    def handshake(ch: Channel, header: dict[str, Any]) -> bool:
        """Receiver: join the sender's group when ``header`` is its handshake."""
        if "gloo_store" not in header:
            return False
        ch.group = join_gloo(str(header["gloo_store"]), ch.sock.getpeername()[0])
        return True


TRANSPORTS: dict[str, Transport] = {t.name: t for t in (TcpTransport(), ShmTransport(),
                                                         GlooTransport())}  # fmt: skip


def on_this_host(host: str) -> bool:
    """Whether ``host`` names this machine: a socket binds only to a local address."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except OSError:
        return False
    for family, _, _, _, addr in infos:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            try:
                s.bind((addr[0], 0))
                return True
            except OSError:
                continue
    return False


def for_destination(name: str, dst: str) -> Transport:
    """The transport ``name`` uses to the receiver at ``dst`` ("host:port")."""
    if name == "auto":
        return TRANSPORTS["shm" if on_this_host(dst.rpartition(":")[0]) else "tcp"]
    return transport(name)


def transport(name: str) -> Transport:
    """The transport called ``name`` (a clear error for any other)."""
    found = TRANSPORTS.get(name)
    if found is None:
        raise ValueError(f"KV transport must be one of {', '.join(TRANSPORTS)}, got {name!r}")
    return found


def arriving(header: dict[str, Any]) -> Transport:
    """The transport a received frame came by."""
    for t in TRANSPORTS.values():
        if t.name != "tcp" and t.claims(header):
            return t
    return TRANSPORTS["tcp"]
