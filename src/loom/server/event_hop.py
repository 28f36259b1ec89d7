"""``EventHop``: one instance's events from the runtime thread to the server's loop.

Events queue here and one loop callback delivers all that queued before it ran: a flood of
messages costs the loop one callback per batch, not one per message, so requests the loop
serves meanwhile are not queued behind a million callbacks. The runtime reads ``full``
after each message and pauses a sender over ``HOP_EVENTS`` or ``HOP_BYTES`` until the
loop has taken them (``when_drained``): an inferlet sends no faster than its client's
loop takes its messages.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

HOP_EVENTS = 1024  # queued events before a sender is paused
HOP_BYTES = 256 << 10  # characters of queued messages before a sender is paused


class EventHop:
    """An instance's event listener (runtime thread) delivering on ``loop``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, deliver: Callable[[str, Any], None]):
        self.loop = loop
        self.deliver = deliver  # (kind, payload), on the loop
        self._lock = threading.Lock()
        self._items: list[tuple[str, Any]] = []
        self._bytes = 0
        self._scheduled = False
        self._on_drained: Callable[[], None] | None = None
        self.peak = 0  # the most events it held at once

    def __call__(self, kind: str, payload: Any) -> None:  # runtime thread
        with self._lock:
            items = self._items
            items.append((kind, payload))
            if len(items) > self.peak:
                self.peak = len(items)
            if isinstance(payload, str):
                self._bytes += len(payload)
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._drain)

    @property
    def full(self) -> bool:
        """Whether a sender should pause (runtime thread; read without the lock: a stale
        answer only pauses one message early or late)."""
        return len(self._items) >= HOP_EVENTS or self._bytes >= HOP_BYTES

    def when_drained(self, fn: Callable[[], None]) -> bool:
        """Call ``fn`` (on the loop) once what is queued now has been delivered; False,
        and no call, when nothing is queued any more."""
        with self._lock:
            if not self._scheduled:
                return False
            self._on_drained = fn
            return True

    def _drain(self) -> None:  # event loop
        with self._lock:
            items, self._items, self._bytes = self._items, [], 0
            self._scheduled = False
            on_drained, self._on_drained = self._on_drained, None
        for kind, payload in items:
            self.deliver(kind, payload)
        if on_drained is not None:
            on_drained()
