"""Shared helpers for tests that run inferlets on a real runtime."""

from __future__ import annotations

from typing import Any


def run_inferlet(rt: Any, program: str, *args: str, timeout: float = 120) -> tuple[Any, list[str]]:
    """Launch, wait for the end; the result and every message the inferlet sent."""
    h = rt.launch(program, list(args))
    result = h.wait(timeout)
    messages = []
    while not h.messages.empty():
        messages.append(h.messages.get())
    return result, messages


def free_pages(rt: Any) -> int:
    """The runtime's free KV pages (pages only the prefix cache holds count as free:
    it gives them back on demand), read on its own thread."""
    return int(rt.query(lambda: rt.pool.num_available()))
