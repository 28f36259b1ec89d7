"""KV transfer between engines: the sender pushes K/V of token slots, one frame per layer,
into slots the receiver reserved (a one-sided put, over TCP).

Interface (DESIGN §3): ``KVSender.put(dst, request_id, slots, layer, kv)`` queues a frame
and returns at once (a sender thread writes it while the next layer computes);
``flush(request_ids)`` sends each request's end frame and waits for the receiver's verdict.
``KVReceiver`` accepts connections, checks every frame against the reservation it
belongs to (unknown or expired request ids and foreign slots are refused, so a late
frame can never write into pages that were given to someone else) and writes accepted
K/V straight into the KV tensor. Positions and liveness of the slots are set only once
every layer of every reserved slot has arrived, so a partial transfer stays invisible.

Every connection opens with the receiver's greeting ``{"loom_kv": 1}``; a receiver with a
secret adds ``"nonce"``, the sender answers ``{"auth": HMAC-SHA256(secret, nonce)}`` and
the receiver ``{"auth": "ok"}`` (or an error, and hangs up) before any frame is taken.

Wire format, both directions little-endian: ``b"LKV1" | u32 header length | u64 payload
length | header (JSON) | payload``. A data frame's header is ``{"rid", "layer", "slots"
(run-length: [start, len, ...]), "dtype", "shape"}`` and its payload the raw K/V of
those slots for that layer (``[2, n, kv_heads, head_dim]``). An end frame is ``{"rid",
"end": true}`` with no payload; the receiver answers it with one frame ``{"rid", "ok",
"error", "bytes"}``. How the payload travels is a transport of ``transports.TRANSPORTS``
(``tcp``: after the header; ``shm``: in a shared-memory segment the header names;
``gloo``: by ``torch.distributed`` send/recv, the header carrying a tag).
"""

from loom.engine.kv_transfer.receiver import KVReceiver, Reservation
from loom.engine.kv_transfer.sender import KVSender, SendStats
from loom.engine.kv_transfer.transports import TRANSPORTS, Transport, transport

__all__ = ["TRANSPORTS", "KVReceiver", "KVSender", "Reservation", "SendStats", "Transport",
           "transport"]  # fmt: skip
