"""The receiving side, in the engine process that owns the KV tensor."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from loom.engine.kv_transfer.transports import Channel, GlooTransport, arriving
from loom.engine.kv_transfer.wire import GREETING_TIMEOUT_S, greet, recv_frame, send_frame, unrle

# Connections served at once: engines keep one per sender and transport; more than this
# is someone else's (each holds a thread), and is closed at once.
MAX_CONNECTIONS = 64


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
    ``on_complete(slots, positions)`` (under the lock) once a reservation is whole.

    With a ``secret``, a connection is served only once its sender proved it holds the
    secret (``wire.greet``); a frame that starts must arrive whole with no gap longer
    than ``progress_s``, or its connection is closed (its requests stay incomplete)."""

    def __init__(
        self,
        kv: torch.Tensor,
        on_complete: Callable[[list[int], list[int]], None],
        host: str = "127.0.0.1",
        port: int = 0,
        secret: str | None = None,
        progress_s: float = 10.0,
    ) -> None:
        self.kv = kv
        self.secret, self.progress_s = secret, progress_s
        self.connections = 0  # being served now
        self.refused = 0  # connections closed for a wrong or missing secret
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
            with self.lock:
                full = self.connections >= MAX_CONNECTIONS
                if not full:
                    self.connections += 1
            if full:
                conn.close()
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                self._frames(conn)
        finally:
            with self.lock:
                self.connections -= 1

    def _admit(self, conn: socket.socket) -> bool:
        """Greet ``conn``; with a secret, whether its sender proved it holds it in time."""
        conn.settimeout(GREETING_TIMEOUT_S)
        try:
            ok = greet(conn, self.secret)
        except (OSError, ValueError):
            ok = False
        conn.settimeout(None)
        if not ok:
            with self.lock:
                self.refused += 1
        return ok

    def _frames(self, conn: socket.socket) -> None:
        row = self.kv[0, :, :1].numel() * self.kv.element_size()  # bytes per slot per layer
        ch = Channel(conn)
        if not self._admit(conn):
            return
        try:
            while True:
                header, payload = recv_frame(
                    conn, max_payload=row * self.kv.shape[2], progress_s=self.progress_s
                )
                rid = str(header.get("rid"))
                if header.get("end"):
                    send_frame(conn, self._finish(rid))
                    continue
                if GlooTransport.handshake(ch, header):
                    continue
                # Take the data off its channel before judging the frame, so a refused
                # frame leaves no segment behind and the stream stays in step.
                via = arriving(header)
                like = self._gloo_buffer(header) if via.name == "gloo" else None
                payload, tensor = via.take(ch, header, payload, like)
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
