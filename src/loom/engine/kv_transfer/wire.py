"""The wire of KV transfer: frames, run-length slot lists, and the shared-memory and
gloo side channels (see the package docstring for the format)."""

from __future__ import annotations

import datetime
import json
import socket
import struct
from typing import Any

MAGIC = b"LKV1"
PREFIX = struct.Struct("<4sIQ")
MAX_HEADER = 1 << 20
# A receiver's first frame on every connection. A sender hears it within
# GREETING_TIMEOUT_S or gives up: an address that is not a Loom KV receiver (a wrong
# port, another service) fails the transfer at once instead of after the full timeout.
GREETING = {"loom_kv": 1}
GREETING_TIMEOUT_S = 2.0


def expect_greeting(sock: socket.socket) -> None:
    """Sender side: the receiver's greeting, or ``OSError`` saying what answered."""
    timeout = sock.gettimeout()
    sock.settimeout(GREETING_TIMEOUT_S)
    try:
        header, _ = recv_frame(sock, max_payload=0)
    except TimeoutError:
        raise OSError("no answer: not a Loom KV receiver") from None
    except ValueError as e:
        raise OSError(f"not a Loom KV receiver ({e})") from None
    finally:
        sock.settimeout(timeout)
    if header != GREETING:
        raise OSError("not a Loom KV receiver (no greeting)")


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
    sock.sendall(PREFIX.pack(MAGIC, len(head), len(payload)) + head)
    if payload:
        sock.sendall(payload)


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


def recv_frame(sock: socket.socket, max_payload: int) -> tuple[dict[str, Any], bytes]:
    magic, hlen, plen = PREFIX.unpack(recv_exact(sock, PREFIX.size))
    if magic != MAGIC:
        raise ValueError("not a KV transport frame")
    if hlen > MAX_HEADER or plen > max_payload:
        raise ValueError("KV frame too large")
    header = json.loads(recv_exact(sock, hlen))
    if not isinstance(header, dict):
        raise ValueError("KV frame header must be an object")
    return header, recv_exact(sock, plen) if plen else b""


GLOO_TIMEOUT = datetime.timedelta(seconds=60)


def join_gloo(address: str) -> Any:
    """The receiving end (rank 1) of a two-process gloo group the sender set up."""
    import torch.distributed as dist

    host, _, port = address.rpartition(":")
    store = dist.TCPStore(host, int(port), 2, False, timeout=GLOO_TIMEOUT)
    return dist.ProcessGroupGloo(store, 1, 2, GLOO_TIMEOUT)


def open_gloo(sock: socket.socket) -> Any:
    """Make a two-process gloo group with the receiver at the other end of ``sock``."""
    import torch.distributed as dist

    host = sock.getsockname()[0]
    store = dist.TCPStore(host, 0, 2, True, timeout=GLOO_TIMEOUT, wait_for_workers=False)
    send_frame(sock, {"gloo_store": f"{host}:{store.port}"})
    return dist.ProcessGroupGloo(store, 0, 2, GLOO_TIMEOUT), store


def take_shm(name: str, nbytes: int) -> bytes:
    """Copy a frame's payload out of the segment the sender made, then remove it."""
    from multiprocessing import resource_tracker, shared_memory

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

    seg = shared_memory.SharedMemory(create=True, size=max(1, len(data)))
    resource_tracker.unregister(seg._name, "shared_memory")  # type: ignore[attr-defined]
    buf = seg.buf
    assert buf is not None
    buf[: len(data)] = data
    name = seg.name
    seg.close()
    return name
