"""Shared helpers for tests that run inferlets on a real runtime."""

from __future__ import annotations

from pathlib import Path
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


def start_test_runtime(tiny_dir: Path, program_cache: Path, guest_threads: int) -> Any:
    """The tiny model on a thread worker, with the limits the runtime tests expect."""
    from loom.config import EngineConfig, RuntimeConfig
    from loom.runtime.runtime import start_runtime

    return start_runtime(
        EngineConfig(model=str(tiny_dir), num_pages=96),
        RuntimeConfig(
            cpu_budget_s=1.5,
            max_pending_messages=200,
            page_wait_timeout_s=20,
            guest_threads=guest_threads,
        ),
        worker_mode="thread",
        cache_dir=program_cache,
    )
