"""The wire of KV transfer: frames, the greeting and its secret, run-length slot lists,
and the shared-memory and gloo side channels (see the package docstring for the format)."""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import secrets
import socket
import struct
from typing import Any

MAGIC = b"LKV1"
PREFIX = struct.Struct("<4sIQ")
MAX_HEADER = 1 << 20
# A receiver's first frame on every connection. A sender hears it within
# GREETING_TIMEOUT_S or gives up: an address that is not a Loom KV receiver (a wrong
# port, another service) fails the transfer at once instead of after the full timeout.
# A receiver with a secret puts a fresh nonce in it; the sender must answer with
# HMAC-SHA256(secret, nonce) within the same time, or the receiver hangs up.
GREETING = {"loom_kv": 1}
GREETING_TIMEOUT_S = 2.0


def _mac(secret: str, nonce: str) -> str:
    return hmac.new(secret.encode(), b"loom-kv1:" + nonce.encode(), hashlib.sha256).hexdigest()


def greet(sock: socket.socket, secret: str | None) -> bool:
    """Receiver side: greet a new connection and, with a secret, check the sender's
    answer (the caller bounds the wait with the socket's timeout). Whether to serve it."""
    if not secret:
        send_frame(sock, GREETING)
        return True
    nonce = secrets.token_hex(16)
    send_frame(sock, {**GREETING, "nonce": nonce})
    header, _ = recv_frame(sock, max_payload=0)
    answer = header.get("auth")
    ok = isinstance(answer, str) and hmac.compare_digest(answer, _mac(secret, nonce))
    send_frame(sock, {"auth": "ok"} if ok else {"error": "wrong KV secret"})
    return ok


def expect_greeting(sock: socket.socket, secret: str | None = None) -> None:
    """Sender side: the receiver's greeting (and, when it asks, proof of the secret), or
    ``OSError`` saying what answered."""
    timeout = sock.gettimeout()
    sock.settimeout(GREETING_TIMEOUT_S)
    try:
        header = _answer(sock)
        if header.get("loom_kv") != GREETING["loom_kv"]:
            raise OSError("not a Loom KV receiver (no greeting)")
        nonce = header.get("nonce")
        if nonce is None:
            return  # a receiver without a secret: it takes frames from anyone who can reach it
        if not secret:
            raise OSError("the receiving engine wants a KV secret (--kv-secret); this one has none")
        send_frame(sock, {"auth": _mac(secret, str(nonce))})
        if _answer(sock).get("auth") != "ok":
            raise OSError("the receiving engine refused this engine's KV secret")
    finally:
        sock.settimeout(timeout)


def _answer(sock: socket.socket) -> dict[str, Any]:
    try:
        return recv_frame(sock, max_payload=0)[0]
    except TimeoutError:
        raise OSError("no answer: not a Loom KV receiver") from None
    except ValueError as e:
        raise OSError(f"not a Loom KV receiver ({e})") from None


def rle(slots: list[int]) -> list[int]:
    """Runs of consecutive slot ids as ``[start, length, start, length, ...]``."""
    out: list[int] = []
    for s in slots:
        if out and out[-2] + out[-1] == s:
            out[-1] += 1
        else:
            out += [s, 1]
    return out


def unrle(runs: list[int]) -> list[int]:
    if len(runs) % 2:
        raise ValueError("run-length slot list must have an even length")
    out: list[int] = []
    for start, n in zip(runs[::2], runs[1::2], strict=True):
        if start < 0 or n <= 0:
            raise ValueError("run-length slot list holds a negative start or empty run")
        out.extend(range(start, start + n))
    return out


def send_frame(sock: socket.socket, header: dict[str, Any], payload: bytes = b"") -> None:
    head = json.dumps(header).encode()
    send_all(sock, PREFIX.pack(MAGIC, len(head), len(payload)) + head)
    if payload:
        send_all(sock, payload)


def send_all(sock: socket.socket, data: bytes) -> None:
    """``sendall`` whose timeout bounds each wait for room in the socket, not the whole
    write (``socket.sendall``'s, since Python 3.5): a slow transfer that moves goes on, one
    that stalls fails after the socket's timeout."""
    view = memoryview(data)
    while view:
        view = view[sock.send(view) :]


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("peer closed the connection")
        got += k
    return bytes(buf)


def recv_frame(
    sock: socket.socket, max_payload: int, progress_s: float | None = None
) -> tuple[dict[str, Any], bytes]:
    """One frame. With ``progress_s``, the wait for its first byte is unbounded (an idle
    link) and each wait for more of it is bounded by ``progress_s`` (a stalled sender)."""
    if progress_s is None:
        return _rest(sock, recv_exact(sock, PREFIX.size), max_payload)
    first = recv_exact(sock, 1)
    sock.settimeout(progress_s)
    try:
        return _rest(sock, first + recv_exact(sock, PREFIX.size - 1), max_payload)
    finally:
        sock.settimeout(None)


def _rest(sock: socket.socket, prefix: bytes, max_payload: int) -> tuple[dict[str, Any], bytes]:
    magic, hlen, plen = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise ValueError("not a KV transport frame")
    if hlen > MAX_HEADER or plen > max_payload:
        raise ValueError("KV frame too large")
    header = json.loads(recv_exact(sock, hlen))
    if not isinstance(header, dict):
        raise ValueError("KV frame header must be an object")
    return header, recv_exact(sock, plen) if plen else b""


GLOO_TIMEOUT = datetime.timedelta(seconds=60)


def join_gloo(address: str, peer: str) -> Any:
    """The receiving end (rank 1) of a two-process gloo group the sender set up; its store
    must be on the sender's host (``peer``), so no frame can send this engine elsewhere."""
    import torch.distributed as dist

    host, _, port = address.rpartition(":")
    if host != peer:
        raise ValueError(f"gloo store {address!r} is not on the sending host {peer}")
    store = dist.TCPStore(host, int(port), 2, False, timeout=GLOO_TIMEOUT)
    return dist.ProcessGroupGloo(store, 1, 2, GLOO_TIMEOUT)


def open_gloo(sock: socket.socket) -> Any:
    """Make a two-process gloo group with the receiver at the other end of ``sock``."""
    import torch.distributed as dist

    host = sock.getsockname()[0]
    store = dist.TCPStore(host, 0, 2, True, timeout=GLOO_TIMEOUT, wait_for_workers=False)
    send_frame(sock, {"gloo_store": f"{host}:{store.port}"})
    return dist.ProcessGroupGloo(store, 0, 2, GLOO_TIMEOUT), store


# Segments a sender makes carry this prefix; a receiver opens (and removes) no other.
SHM_PREFIX = "loomkv_"


def take_shm(name: str, nbytes: int) -> bytes:
    """Copy a frame's payload out of the segment the sender made, then remove it."""
    from multiprocessing import resource_tracker, shared_memory

    if not name.startswith(SHM_PREFIX) or not name[len(SHM_PREFIX) :].isalnum():
        raise ValueError(f"{name!r} is not a KV frame's shared-memory segment")
    seg = shared_memory.SharedMemory(name=name)
    try:
        # Attaching registers the segment with this process's tracker too (Python 3.11);
        # the sender created it and this side removes it, so neither should track it.
        resource_tracker.unregister(seg._name, "shared_memory")  # type: ignore[attr-defined]
        if nbytes > seg.size:
            raise ValueError("shared-memory frame shorter than announced")
        buf = seg.buf
        assert buf is not None
        return bytes(buf[:nbytes])
    finally:
        seg.close()
        seg.unlink()


def put_shm(data: bytes) -> str:
    from multiprocessing import resource_tracker, shared_memory

    name = SHM_PREFIX + secrets.token_hex(12)
    seg = shared_memory.SharedMemory(name=name, create=True, size=max(1, len(data)))
    resource_tracker.unregister(seg._name, "shared_memory")  # type: ignore[attr-defined]
    buf = seg.buf
    assert buf is not None
    buf[: len(data)] = data
    seg.close()
    return name
