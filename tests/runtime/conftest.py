"""Runtime fixtures: the test inferlet (built once per session) and a running runtime."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.runtime_helpers import start_test_runtime

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
    # Turns one by one on the runtime thread on any machine (test_turn_pool.py has the
    # pool): the batching tests count passes of that order.
    runtime = start_test_runtime(tiny_dir, program_cache, guest_threads=1)
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def testkit(rt: object, testkit_wasm: bytes) -> str:
    return rt.add_program(testkit_wasm)  # type: ignore[attr-defined,no-any-return]
