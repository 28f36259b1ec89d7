"""Agent fixtures: a runtime that may call 127.0.0.1 and a real tool server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loom.testing.tool_server import ToolServer

INFERLETS = Path(__file__).resolve().parents[2] / "inferlets"


@pytest.fixture(scope="module")
def art(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from loom.config import EngineConfig, RuntimeConfig
    from loom.runtime.runtime import start_runtime

    runtime = start_runtime(
        EngineConfig(model=str(tiny_dir), num_pages=256),
        RuntimeConfig(http_allow_hosts=("127.0.0.1",), http_timeout_s=1.0),
        worker_mode="thread",
        cache_dir=tmp_path_factory.mktemp("agent-programs"),
    )
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def tools() -> Iterator[ToolServer]:
    with ToolServer(latency_ms=5) as server:
        yield server


def program(rt: Any, app: str) -> str:
    from loom.sdk.build import build_inferlet

    return rt.add_program(build_inferlet(INFERLETS / app).read_bytes())  # type: ignore[no-any-return]


def pages_in_use(rt: Any) -> int:
    """KV pages held once the prefix cache lets go (persistent exports still hold theirs)."""

    def count() -> int:
        rt.prefix_cache.clear()
        return int(rt.pool.num_pages - rt.pool.num_free)

    return int(rt.query(count))


def drop_exports(rt: Any) -> None:
    def drop() -> None:
        for name in list(rt.exports.exports):
            rt.exports.remove(name)

    rt.query(drop)
