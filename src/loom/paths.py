"""Where Loom keeps what it makes: ``$LOOM_CACHE_DIR``, else ``~/.cache/loom``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The root of every cache (tiny model, compiled programs, built inferlets)."""
    return Path(os.environ.get("LOOM_CACHE_DIR") or Path.home() / ".cache" / "loom")
