"""SDK fixtures: the SDK test inferlet, built once per session, on a running runtime."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

APPS = Path(__file__).parent / "apps"


@pytest.fixture(scope="module")
def srt(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from loom.config import EngineConfig, RuntimeConfig
    from loom.runtime.runtime import start_runtime

    runtime = start_runtime(
        EngineConfig(model=str(tiny_dir), num_pages=128),
        RuntimeConfig(page_wait_timeout_s=20),
        worker_mode="thread",
        cache_dir=tmp_path_factory.mktemp("sdk-programs"),
    )
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def sdkkit(srt: object, sdkkit_wasm: bytes) -> str:
    return srt.add_program(sdkkit_wasm)  # type: ignore[attr-defined,no-any-return]
