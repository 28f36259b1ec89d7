"""The sending side: frames queued per destination, written by one thread each."""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from loom.engine.kv_transfer.transports import Channel, for_destination, transport
from loom.engine.kv_transfer.wire import (
    GREETING_TIMEOUT_S,
    expect_greeting,
    recv_frame,
    rle,
    send_frame,
)


@dataclass
class SendStats:
    bytes: int = 0
    frames: int = 0
    send_s: float = 0.0  # time the sender thread spent writing frames
    exposed_s: float = 0.0  # time flush waited after compute ended
    error: str | None = None

    @property
    def hidden_s(self) -> float:
        """Transfer time overlapped with compute."""
        return max(0.0, self.send_s - self.exposed_s)


class KVSender:
    """Queues frames per destination; one thread per destination writes them in order.

    ``mode`` names the transport of the K/V bytes (``transports.TRANSPORTS``): ``tcp`` on
    the socket, ``shm`` in shared memory (engines on one host), ``gloo`` through
    ``torch.distributed`` (a two-process gloo group per receiver, NCCL's CPU sibling),
    ``auto`` shm to receivers on this host and tcp to others; frame headers always go on
    the socket.

    Three clocks bound a transfer: the connection and the receiver's greeting (2 s each:
    ``wire.GREETING_TIMEOUT_S``), progress (a socket wait that moves no byte for
    ``progress_s`` fails it), and the whole (``timeout_s``, for the receiver's verdict).
    ``secret`` answers a receiver that asks for it (``wire.expect_greeting``)."""

    def __init__(
        self,
        timeout_s: float = 60.0,
        mode: str = "tcp",
        secret: str | None = None,
        progress_s: float = 10.0,
    ) -> None:
        if mode != "auto":
            transport(mode)  # an unknown name fails here, not at the first transfer
        self.timeout_s = timeout_s
        self.mode = mode
        self.secret, self.progress_s = secret, progress_s
        self._links: dict[str, _Link] = {}
        self.stats: dict[str, SendStats] = {}

    def put(self, dst: str, rid: str, slots: list[int], layer: int, kv: torch.Tensor) -> None:
        """Queue one layer's K/V (``[2, n, kv_heads, head_dim]``) for ``slots`` on ``dst``."""
        st = self.stats.setdefault(rid, SendStats())
        if st.error is not None:
            return
        link = self._link(dst, st)
        if link is not None:
            link.queue.put((rid, {"layer": layer, "slots": rle(slots)}, kv))

    def flush(self, requests: dict[str, str]) -> dict[str, SendStats]:
        """End each request (``rid -> dst``) and wait for the receivers' verdicts."""
        t0 = time.perf_counter()
        waits: list[tuple[str, threading.Event, dict[str, Any]]] = []
        for rid, dst in requests.items():
            st = self.stats.setdefault(rid, SendStats())
            if st.error is not None:
                continue  # it failed already (no second wait on a receiver that is not there)
            link = self._link(dst, st)
            if link is None:
                continue
            done, box = threading.Event(), dict[str, Any]()
            link.queue.put((rid, {"end": True}, (done, box)))
            waits.append((rid, done, box))
        for rid, done, box in waits:
            st = self.stats[rid]
            if not done.wait(self.timeout_s):
                st.error = st.error or "no answer from the receiving engine"
            elif not box.get("ok"):
                st.error = st.error or str(box.get("error") or "the receiver refused the KV")
        exposed = time.perf_counter() - t0
        out = {}
        for rid in requests:
            st = self.stats.pop(rid, SendStats(error="nothing was sent"))
            st.exposed_s = exposed
            out[rid] = st
        return out

    def _link(self, dst: str, st: SendStats) -> _Link | None:
        link = self._links.get(dst)
        if link is None or not link.alive:
            try:
                link = self._links[dst] = _Link(dst, self)
            except OSError as e:
                st.error = f"cannot connect to {dst}: {e}"
                return None
        return link

    def close(self) -> None:
        for link in self._links.values():
            link.close()


class _Link:
    def __init__(self, dst: str, owner: KVSender) -> None:
        host, _, port = dst.rpartition(":")
        # A short connect: an engine is on the same network or it is not there.
        self.sock = socket.create_connection((host, int(port)), timeout=GREETING_TIMEOUT_S)
        # Small frames (headers, end frames, answers) must not wait for Nagle's algorithm
        # (40 ms of delayed ACK per exchange on loopback).
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            expect_greeting(self.sock, owner.secret)
        except OSError:
            self.sock.close()
            raise
        # Every later wait on the socket (room to write, the receiver's verdict) must see
        # progress within progress_s: a receiver that stops reading fails the transfer then.
        self.sock.settimeout(owner.progress_s)
        self.owner = owner
        self.transport = for_destination(owner.mode, dst)
        self.alive = True
        self.channel = Channel(self.sock)
        self.queue: queue.Queue[tuple[str, dict[str, Any], Any] | None] = queue.Queue()
        threading.Thread(target=self._run, name=f"loom-kv-send-{dst}", daemon=True).start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            rid, header, body = item
            st = self.owner.stats.get(rid) or SendStats()
            try:
                if header.get("end"):
                    done, box = body
                    send_frame(self.sock, {"rid": rid, "end": True})
                    reply, _ = recv_frame(self.sock, max_payload=0)
                    box.update(reply)
                    done.set()
                    continue
                t0 = time.perf_counter()
                meta = {"rid": rid, "dtype": str(body.dtype), "shape": list(body.shape), **header}
                st.bytes += self.transport.send(self.channel, meta, body)
                st.send_s += time.perf_counter() - t0
                st.frames += 1
            except (OSError, ValueError, RuntimeError) as e:
                self.alive = False
                stalled = isinstance(e, TimeoutError)
                why = f"no progress for {self.owner.progress_s:g} s" if stalled else str(e)
                st.error = f"KV transfer failed: {why}"
                if header.get("end"):
                    body[1].update({"ok": False, "error": st.error})
                    body[0].set()
                self._fail_rest(why)
                return

    def _fail_rest(self, why: str) -> None:
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return
            if item is not None and item[1].get("end"):
                item[2][1].update({"ok": False, "error": f"KV transfer failed: {why}"})
                item[2][0].set()

    def close(self) -> None:
        self.queue.put(None)
        with contextlib.suppress(OSError):
            self.sock.close()
