"""Clean exits on SIGTERM for the long-running commands (`loom serve`, `loom router`).

uvicorn shuts down gracefully on SIGTERM and then raises the signal again with the
handler it found installed. With Python's default handler that kills the process on the
spot: `finally` blocks never run, so the engine worker, or the engine processes a router
started, would outlive it. Installing a handler that raises ``SystemExit`` first turns the
re-raised signal into an ordinary exit that unwinds through them.
"""

from __future__ import annotations

import signal
from types import FrameType


def _exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def exit_cleanly_on_sigterm() -> None:
    """Make SIGTERM end the process through ``SystemExit`` (call from the main thread)."""
    signal.signal(signal.SIGTERM, _exit)
