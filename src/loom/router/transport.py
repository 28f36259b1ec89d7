"""KV transport between engines: the sender pushes K/V of token slots, one frame per layer,
into slots the receiver reserved (a one-sided put, over TCP).

Interface (DESIGN §3): ``KVSender.put(dst, request_id, slots, layer, kv)`` queues a frame
and returns at once (a sender thread writes it while the next layer computes);
``flush(request_ids)`` sends each request's end frame and waits for the receiver's verdict.
``KVReceiver`` accepts connections, checks every frame against the reservation it
belongs to (unknown or expired request ids and foreign slots are refused, so a late
frame can never write into pages that were given to someone else) and writes accepted
K/V straight into the KV tensor. Positions and liveness of the slots are set only once
every layer of every reserved slot has arrived, so a partial transfer stays invisible.

Wire format, both directions little-endian: ``b"LKV1" | u32 header length | u64 payload
length | header (JSON) | payload``. A data frame's header is ``{"rid", "layer", "slots"
(run-length: [start, len, ...]), "dtype", "shape"}`` and its payload the raw K/V of
those slots for that layer (``[2, n, kv_heads, head_dim]``). An end frame is ``{"rid",
"end": true}`` with no payload; the receiver answers it with one frame ``{"rid", "ok",
"error", "bytes"}``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

MAGIC = b"LKV1"
_PREFIX = struct.Struct("<4sIQ")
MAX_HEADER = 1 << 20


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


def _send_frame(sock: socket.socket, header: dict[str, Any], payload: bytes = b"") -> None:
    head = json.dumps(header).encode()
    sock.sendall(_PREFIX.pack(MAGIC, len(head), len(payload)) + head)
    if payload:
        sock.sendall(payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("peer closed the connection")
        got += k
    return bytes(buf)


def _recv_frame(sock: socket.socket, max_payload: int) -> tuple[dict[str, Any], bytes]:
    magic, hlen, plen = _PREFIX.unpack(_recv_exact(sock, _PREFIX.size))
    if magic != MAGIC:
        raise ValueError("not a KV transport frame")
    if hlen > MAX_HEADER or plen > max_payload:
        raise ValueError("KV frame too large")
    header = json.loads(_recv_exact(sock, hlen))
    if not isinstance(header, dict):
        raise ValueError("KV frame header must be an object")
    return header, _recv_exact(sock, plen) if plen else b""


# ===== receiving side (in the engine process that owns the KV tensor) =====


@dataclass
class Reservation:
    slots: list[int]  # receiver slot ids, in position order
    positions: list[int]
    layers_done: dict[int, set[int]] = field(default_factory=dict)  # layer -> slots received
    bytes: int = 0
    error: str | None = None
    complete: bool = False


class KVReceiver:
    """Accepts KV frames into ``kv`` ([layers, 2, slots, kv_heads, head_dim]); call
    ``on_complete(slots, positions)`` (under the lock) once a reservation is whole."""

    def __init__(
        self,
        kv: torch.Tensor,
        on_complete: Callable[[list[int], list[int]], None],
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.kv = kv
        self.num_layers = kv.shape[0]
        self.on_complete = on_complete
        self.lock = threading.Lock()
        self.reservations: dict[str, Reservation] = {}
        self.received_bytes = 0
        self._server = socket.create_server((host, port))
        bound_host, bound_port = self._server.getsockname()[:2]
        self.address = f"{bound_host}:{bound_port}"
        self._thread = threading.Thread(target=self._accept, name="loom-kv-recv", daemon=True)
        self._thread.start()

    def reserve(self, rid: str, slots: list[int], positions: list[int]) -> None:
        with self.lock:
            self.reservations[rid] = Reservation(list(slots), list(positions))

    def release(self, rid: str) -> None:
        with self.lock:
            self.reservations.pop(rid, None)

    def status(self, rid: str) -> dict[str, Any] | None:
        with self.lock:
            r = self.reservations.get(rid)
            if r is None:
                return None
            return {
                "complete": r.complete,
                "bytes": r.bytes,
                "error": r.error,
                "expected": len(r.slots),
            }

    def close(self) -> None:
        self._server.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        row = self.kv[0, :, :1].numel() * self.kv.element_size()  # bytes per slot per layer
        group: Any = None  # a torch.distributed (gloo) pair group, when the sender asks
        with conn:
            try:
                while True:
                    header, payload = _recv_frame(conn, max_payload=row * self.kv.shape[2])
                    rid = str(header.get("rid"))
                    if header.get("end"):
                        _send_frame(conn, self._finish(rid))
                        continue
                    if "gloo_store" in header:
                        group = _join_gloo(str(header["gloo_store"]))
                        continue
                    # Take the data off its channel before judging the frame, so a refused
                    # frame leaves no segment behind and the stream stays in step.
                    tensor = None
                    if header.get("gloo"):
                        if group is None:
                            raise ValueError("a gloo frame before the gloo handshake")
                        tensor = self._gloo_buffer(header)
                        group.recv([tensor], 0, int(header["tag"])).wait()
                    elif "shm" in header:
                        payload = _take_shm(str(header["shm"]), int(header["nbytes"]))
                    self._write(rid, header, payload, tensor)
            except (ConnectionError, OSError, ValueError, RuntimeError, KeyError, TypeError):
                return  # the sender went away or spoke nonsense: its requests stay incomplete

    def _gloo_buffer(self, header: dict[str, Any]) -> torch.Tensor:
        shape = [int(x) for x in header["shape"]]
        if (
            len(shape) != 4
            or shape[0] != 2
            or list(shape[2:]) != list(self.kv.shape[3:])
            or not 0 < shape[1] <= self.kv.shape[2]
            or header.get("dtype") != str(self.kv.dtype)
        ):
            raise ValueError("gloo frame shape or dtype does not match this engine's KV")
        return torch.empty(shape, dtype=self.kv.dtype)

    def _write(
        self, rid: str, header: dict[str, Any], payload: bytes, tensor: torch.Tensor | None = None
    ) -> None:
        with self.lock:
            r = self.reservations.get(rid)
            if r is None or r.error is not None:
                return  # unknown, expired or already failed: the end frame reports it
            try:
                layer = int(header["layer"])
                slots = unrle(list(header["slots"]))
                if not 0 <= layer < self.num_layers:
                    raise ValueError(f"layer {layer} out of range")
                allowed = set(r.slots)
                if any(s not in allowed for s in slots):
                    raise ValueError("frame writes slots outside the reservation")
                shape = (2, len(slots), *self.kv.shape[3:])
                if tensor is None:
                    t = torch.frombuffer(bytearray(payload), dtype=self.kv.dtype).view(shape)
                else:
                    t = tensor.view(shape)
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                r.error = f"bad KV frame: {e}"
                return
            idx = torch.tensor(slots, dtype=torch.long, device=self.kv.device)
            self.kv[layer].index_copy_(1, idx, t.to(self.kv.device))
            r.layers_done.setdefault(layer, set()).update(slots)
            nbytes = t.numel() * t.element_size()
            r.bytes += nbytes
            self.received_bytes += nbytes

    def _finish(self, rid: str) -> dict[str, Any]:
        with self.lock:
            r = self.reservations.get(rid)
            if r is None:
                why = "no reservation with this request id (expired or unknown)"
                return {"rid": rid, "ok": False, "bytes": 0, "error": why}
            want = set(r.slots)
            if r.error is None and not all(
                r.layers_done.get(layer, set()) >= want for layer in range(self.num_layers)
            ):
                r.error = "incomplete transfer: some layers or slots never arrived"
            if r.error is None and not r.complete:
                r.complete = True
                self.on_complete(r.slots, r.positions)
            return {"rid": rid, "ok": r.error is None, "error": r.error, "bytes": r.bytes}


_GLOO_TIMEOUT = datetime.timedelta(seconds=60)


def _join_gloo(address: str) -> Any:
    """The receiving end (rank 1) of a two-process gloo group the sender set up."""
    import torch.distributed as dist

    host, _, port = address.rpartition(":")
    store = dist.TCPStore(host, int(port), 2, False, timeout=_GLOO_TIMEOUT)
    return dist.ProcessGroupGloo(store, 1, 2, _GLOO_TIMEOUT)


def _open_gloo(sock: socket.socket) -> Any:
    """Make a two-process gloo group with the receiver at the other end of ``sock``."""
    import torch.distributed as dist

    host = sock.getsockname()[0]
    store = dist.TCPStore(host, 0, 2, True, timeout=_GLOO_TIMEOUT, wait_for_workers=False)
    _send_frame(sock, {"gloo_store": f"{host}:{store.port}"})
    return dist.ProcessGroupGloo(store, 0, 2, _GLOO_TIMEOUT), store


def _take_shm(name: str, nbytes: int) -> bytes:
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


def _put_shm(data: bytes) -> str:
    from multiprocessing import resource_tracker, shared_memory

    seg = shared_memory.SharedMemory(create=True, size=max(1, len(data)))
    resource_tracker.unregister(seg._name, "shared_memory")  # type: ignore[attr-defined]
    buf = seg.buf
    assert buf is not None
    buf[: len(data)] = data
    name = seg.name
    seg.close()
    return name


# ===== sending side =====


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

    ``mode="tcp"`` sends K/V bytes on the socket; ``mode="shm"`` (engines on one host)
    puts each frame's bytes in a shared-memory segment and sends only its name, so the
    data never goes through the socket; ``mode="gloo"`` sends the tensors with
    ``torch.distributed`` (a two-process gloo group per receiver, NCCL's CPU sibling) and
    only frame headers on the socket."""

    def __init__(self, timeout_s: float = 60.0, mode: str = "tcp") -> None:
        if mode not in ("tcp", "shm", "gloo"):
            raise ValueError(f"KV transport must be 'tcp', 'shm' or 'gloo', got {mode!r}")
        self.timeout_s = timeout_s
        self.mode = mode
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
        self.sock = socket.create_connection((host, int(port)), timeout=owner.timeout_s)
        # Small frames (headers, end frames, answers) must not wait for Nagle's algorithm
        # (40 ms of delayed ACK per exchange on loopback).
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.owner = owner
        self.alive = True
        self.group: Any = None  # (gloo group, its store) once the first gloo frame goes
        self.tag = 0
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
                    _send_frame(self.sock, {"rid": rid, "end": True})
                    reply, _ = _recv_frame(self.sock, max_payload=0)
                    box.update(reply)
                    done.set()
                    continue
                t0 = time.perf_counter()
                data = b""
                if self.owner.mode != "gloo":
                    data = body.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
                meta = {"rid": rid, "dtype": str(body.dtype), "shape": list(body.shape), **header}
                if self.owner.mode == "gloo":
                    if self.group is None:
                        self.group = _open_gloo(self.sock)
                    self.tag += 1
                    _send_frame(self.sock, {**meta, "gloo": True, "tag": self.tag})
                    tensor = body.detach().contiguous().cpu()
                    self.group[0].send([tensor], 1, self.tag).wait()
                    data = b""
                    st.bytes += tensor.numel() * tensor.element_size()
                elif self.owner.mode == "shm":
                    meta.update(shm=_put_shm(data), nbytes=len(data))
                    _send_frame(self.sock, meta)
                else:
                    _send_frame(self.sock, meta, data)
                st.send_s += time.perf_counter() - t0
                st.bytes += len(data)
                st.frames += 1
            except (OSError, ValueError, RuntimeError) as e:
                self.alive = False
                st.error = f"KV transfer failed: {e}"
                if header.get("end"):
                    body[1].update({"ok": False, "error": st.error})
                    body[0].set()
                self._fail_rest(str(e))
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
