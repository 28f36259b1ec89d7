"""Two real engine processes (``loom engine``) on 127.0.0.1, each pinned to its own core."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="module")
def engines(tiny_dir: Path) -> Iterator[list[Any]]:
    from loom.router.engines import start_engines

    procs = start_engines(2, str(tiny_dir), extra_args=["--num-pages", "256"], quiet=True)
    yield procs
    for p in procs:
        p.stop()


@pytest.fixture(scope="module")
def llm(tiny_dir: Path) -> Any:
    from loom import LLM

    return LLM(str(tiny_dir), num_pages=128)
