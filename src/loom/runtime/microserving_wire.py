"""Microserving's wire and bookkeeping: KV addresses (slot runs as base64 JSON), token
windows, the error a refused call carries, the peers an engine may send KV to, each
client's reservation quota, and the transfer counters ``/metrics`` reports."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loom.engine.kv_transfer.wire import rle

if TYPE_CHECKING:
    from loom.engine.worker import KVTransferResult


class MicroservingError(Exception):
    """A refused call: ``status`` is the HTTP status the server answers with."""

    def __init__(self, status: int, message: str, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def encode_addr(slots: list[int]) -> str:
    """Slot ids as base64(JSON ``[n_segments, start_1, len_1, ...]``), runs merged."""
    runs = rle(slots)
    return base64.b64encode(json.dumps([len(runs) // 2, *runs]).encode()).decode()


def decode_addr(info: str) -> list[int]:
    try:
        data = json.loads(base64.b64decode(info, validate=True))
        n, runs = int(data[0]), [int(x) for x in data[1:]]
    except (ValueError, TypeError, IndexError) as e:
        raise MicroservingError(400, f"kv_addr_info is not a valid KV address: {e}") from None
    if len(runs) != 2 * n or any(x < 0 for x in runs) or any(k == 0 for k in runs[1::2]):
        raise MicroservingError(400, "kv_addr_info: segment count and runs do not agree")
    return [
        s for start, k in zip(runs[::2], runs[1::2], strict=True) for s in range(start, start + k)
    ]


def resolve_window(index: int, length: int, name: str) -> int:
    """A Python-style (possibly negative) token index resolved against ``length``."""
    at = index + length if index < 0 else index
    if not 0 <= at < length:
        raise MicroservingError(
            400,
            f"{name}={index} is outside the prompt of {length} tokens ({name} must be "
            f"less than the prompt length; negative values count from the end)",
        )
    return at


def send_window(length: int, begin: int, end: int, addr: str) -> tuple[int, int, list[int]]:
    """A ``remote_send``'s window resolved and checked against its KV address: (begin,
    end, the receiver's slots)."""
    end = resolve_window(end, length, "end")
    begin = resolve_window(begin, length, "begin")
    if begin >= end:
        raise MicroservingError(400, f"begin ({begin}) must be less than end ({end})")
    remote = decode_addr(addr)
    if len(remote) != end - begin:
        raise MicroservingError(400, f"kv_addr_info holds {len(remote)} slots; the window "
                                     f"[{begin}:{end}] has {end - begin} tokens")  # fmt: skip
    return begin, end, remote


def check_prompt(prompt: list[int], max_model_len: int, vocab_size: int) -> None:
    if not prompt:
        raise MicroservingError(400, "the prompt is empty")
    if len(prompt) >= max_model_len:
        raise MicroservingError(400, f"the prompt exceeds the context ({max_model_len})")
    if any(not 0 <= t < vocab_size for t in prompt):
        raise MicroservingError(400, f"token ids must lie in [0, {vocab_size})")


def peer_address(text: str) -> str:
    """A KV receiver's address as ``host:port``, checked (400 otherwise)."""
    host, _, port = text.strip().rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise MicroservingError(400, f"{text!r} is not a KV receiver's 'host:port'")
    return f"{host.lower()}:{int(port)}"


class KnownPeers:
    """The KV receivers ``remote_send`` may connect to: the configured ones, those
    registered (by a router, through the API key), and this engine's own. Anything else
    is refused before a connection is tried, so the endpoint cannot probe the network."""

    MAX = 1024  # registered addresses kept; a router registers each of its engines once

    def __init__(self) -> None:
        self.registered: set[str] = set()

    def add(self, addresses: Iterable[str]) -> None:
        new = {peer_address(a) for a in addresses}
        if len(self.registered | new) > self.MAX:
            raise MicroservingError(400, f"more than {self.MAX} KV peers registered")
        self.registered |= new

    def check(self, dst: str, configured: Iterable[str], own: str | None) -> str:
        """``dst`` normalized, if this engine may send to it (403 otherwise)."""
        if not dst or ":" not in dst:
            raise MicroservingError(400, "recv_engine must be the receiver's 'host:port'")
        addr = peer_address(dst)
        static = {peer_address(a) for entry in configured for a in entry.split(",") if a}
        if addr in self.registered or addr in static or addr == own:
            return addr
        raise MicroservingError(
            403,
            f"recv_engine {dst!r} is not a known KV peer of this engine (a router registers "
            "its engines with POST /microserving/peers; an operator lists them in --kv-peers)",
            "unknown_peer",
        )


class ReservationQuota:
    """KV pages each client's ``prep_recv`` reservations hold, held to a share of the
    pool: one client cannot pin the pool for the reservations' lifetime."""

    def __init__(self) -> None:
        self.held: dict[str, int] = {}

    def take(self, client: str, pages: int, share: float, pool_pages: int) -> None:
        """Count ``pages`` for ``client``, or refuse them (429) past its share."""
        cap = max(1, int(share * pool_pages))
        held = self.held.get(client, 0)
        if held + pages > cap:
            raise MicroservingError(
                429,
                f"this client's KV reservations would hold {held + pages} pages, over its "
                f"share ({cap} of {pool_pages}, --max-reserved-share {share:g}); start, abort "
                "or let some expire first",
                "reservation_quota",
            )
        self.held[client] = held + pages

    def give(self, client: str, pages: int) -> None:
        left = self.held.get(client, 0) - pages
        if left > 0:
            self.held[client] = left
        else:
            self.held.pop(client, None)


@dataclass
class TransferCounters:
    sent_bytes: int = 0
    sends: int = 0
    send_s: float = 0.0
    hidden_s: float = 0.0
    failed_sends: int = 0
    received_requests: int = 0
    expired: int = 0
    recent: list[dict[str, Any]] = field(default_factory=list)

    def count(self, t: KVTransferResult, tokens: int) -> None:
        """One finished send."""
        self.sends += 1
        self.sent_bytes += t.bytes
        self.send_s += t.send_s
        self.hidden_s += max(0.0, t.send_s - t.exposed_s)
        self.recent.append({"rid": t.rid, "bytes": t.bytes, "tokens": tokens,
                            "send_s": t.send_s, "exposed_s": t.exposed_s})  # fmt: skip
        del self.recent[:-1000]
