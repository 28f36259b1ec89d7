"""Microserving's wire: KV addresses (slot runs as base64 JSON), token windows, the
error a refused call carries, and the transfer counters ``/metrics`` reports."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

from loom.engine.kv_transfer.wire import rle


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
