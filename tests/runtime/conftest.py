"""Runtime fixtures: the test inferlet (built once per session) and a running runtime."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

GUESTS = Path(__file__).parent / "guests"


@pytest.fixture(scope="session")
def testkit_wasm(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The raw-bindings test inferlet, built with componentize-py (about 10 s, once)."""
    from loom.sdk.build import build_inferlet

    return build_inferlet(GUESTS / "testkit", sdk=False).read_bytes()


@pytest.fixture(scope="session")
def program_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Shared by every runtime of the session: the component compiles once (~10 s).
    return tmp_path_factory.mktemp("programs")


@pytest.fixture(scope="module")
def rt(tiny_dir: Path, program_cache: Path) -> Iterator[object]:
    from loom.config import EngineConfig, RuntimeConfig
    from loom.runtime.runtime import start_runtime

    runtime = start_runtime(
        EngineConfig(model=str(tiny_dir), num_pages=96),
        # Turns one by one on the runtime thread on any machine (test_turn_pool.py has the
        # pool): the batching tests count passes of that order.
        RuntimeConfig(
            cpu_budget_s=1.5, max_pending_messages=200, page_wait_timeout_s=20, guest_threads=1
        ),
        worker_mode="thread",
        cache_dir=program_cache,
    )
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def testkit(rt: object, testkit_wasm: bytes) -> str:
    return rt.add_program(testkit_wasm)  # type: ignore[attr-defined,no-any-return]
