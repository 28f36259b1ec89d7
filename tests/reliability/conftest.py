"""Reliability fixtures: a runtime of its own (faults here must not leak into other
tests' runtimes) and the SDK test inferlet on it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="module")
def rrt(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from loom.config import EngineConfig, RuntimeConfig
    from loom.runtime.runtime import start_runtime

    runtime = start_runtime(
        EngineConfig(model=str(tiny_dir), num_pages=128),
        RuntimeConfig(page_wait_timeout_s=20),
        worker_mode="thread",
        cache_dir=tmp_path_factory.mktemp("reliability-programs"),
    )
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def kit(rrt: Any, sdkkit_wasm: bytes) -> str:
    return rrt.add_program(sdkkit_wasm)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def testkit(rrt: Any) -> str:
    """The runtime's raw-WIT test guest (``tests/runtime/guests/testkit``)."""
    from loom.sdk.build import build_inferlet

    guest = Path(__file__).parents[1] / "runtime" / "guests" / "testkit"
    return rrt.add_program(build_inferlet(guest, sdk=False).read_bytes())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def server(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A whole ``loom serve`` in this process, on 127.0.0.1."""
    from loom.config import ServeConfig
    from loom.server.app import BackgroundServer

    config = ServeConfig.of(model=str(tiny_dir), port=0, worker="thread", num_pages=128,
                            program_dir=str(tmp_path_factory.mktemp("uploads")))  # fmt: skip
    with BackgroundServer(config) as srv:
        yield srv
