"""Session fixtures: the tiny model and one random HF model per family, made locally."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Never touch the user's cache from tests: the embedded default is made in a temp dir.
os.environ.setdefault("LOOM_CACHE_DIR", tempfile.mkdtemp(prefix="loom-test-cache-"))
# Without a GPU, Triton kernels run in Triton's interpreter (read once, at its import).
if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from loom.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> dict[str, Path]:
    """family -> a random-weight HF model directory using the tiny tokenizer."""
    from tests.model_factory import FAMILIES, make_hf_model

    root = tmp_path_factory.mktemp("families")
    dirs = {}
    for fam in FAMILIES:
        make_hf_model(fam, root / fam, vocab_size=2048, tokenizer_from=tiny_dir)
        dirs[fam] = root / fam
    return dirs


@pytest.fixture()
def tiny_llm(tiny_dir: Path) -> Iterator[object]:
    from loom import LLM
    from tests.helpers import assert_all_pages_free

    llm = LLM(str(tiny_dir), num_pages=256)
    yield llm
    assert_all_pages_free(llm)


@pytest.fixture(scope="session")
def sdkkit_wasm() -> bytes:
    """The SDK test inferlet (``tests/sdk/apps/sdkkit``), built once per session."""
    from loom.sdk.build import build_inferlet

    return build_inferlet(Path(__file__).parent / "sdk" / "apps" / "sdkkit").read_bytes()
