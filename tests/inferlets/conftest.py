"""Fixtures for the technique inferlets: a runtime on the tiny model, and builds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

INFERLETS = Path(__file__).resolve().parents[2] / "inferlets"


@pytest.fixture(scope="module")
def irt(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from loom.config import EngineConfig, RuntimeConfig
    from loom.runtime.runtime import start_runtime

    runtime = start_runtime(
        EngineConfig(model=str(tiny_dir), num_pages=256),
        RuntimeConfig(),
        worker_mode="thread",
        cache_dir=tmp_path_factory.mktemp("technique-programs"),
    )
    yield runtime
    runtime.close()


def program(rt: Any, app: str) -> str:
    from loom.sdk.build import build_inferlet

    return rt.add_program(build_inferlet(INFERLETS / app).read_bytes())  # type: ignore[no-any-return]


def reply(rt: Any, prog: str, *args: str) -> str:
    """Run to the end; the inferlet's returned string."""
    from tests.runtime_helpers import run_inferlet

    result, messages = run_inferlet(rt, prog, *args)
    assert result.ok, result.error
    return messages[-1]
