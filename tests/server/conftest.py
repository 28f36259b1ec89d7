"""A real server on 127.0.0.1 (uvicorn in a thread, an ephemeral port) over the tiny model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

API_KEY = "test-key-1"


@pytest.fixture(scope="module")
def server(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from loom.config import ServeConfig
    from loom.server.app import BackgroundServer

    settings = ServeConfig.of(
        model=str(tiny_dir),
        port=0,
        worker="thread",
        num_pages=256,
        api_keys=[API_KEY],
        max_upload_mb=40,
        program_dir=str(tmp_path_factory.mktemp("uploads")),
        cpu_budget_s=30.0,
    )
    with BackgroundServer(settings) as srv:
        yield srv


@pytest.fixture(scope="module")
def model_name(server: Any) -> str:
    return str(server.state.model_name)
