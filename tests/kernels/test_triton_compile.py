"""The Triton kernels compile for the GPUs Loom targets, with no GPU at hand.

The other kernel tests run the kernels in Triton's interpreter on CPU, and the interpreter
runs code the GPU compiler refuses. So every kernel is also compiled here, ahead of time,
to Hopper (sm_90: H100, H200) and Ampere (sm_80: A100) binaries, with the arguments its
launch site passes for the shapes of real checkpoints of each family Loom serves
(``triton_compile_worker.py`` does the compiling, in a process without the interpreter).
A kernel must compile, fit an SM's shared memory and keep its values in registers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loom.kernels import triton_decode

pytestmark = pytest.mark.skipif(not triton_decode.available(), reason="Triton not installed")

WORKER = Path(__file__).with_name("triton_compile_worker.py")
SHAPES = ["llama-1b", "qwen2-0.5b", "qwen3-0.6b", "mistral-7b"]
HOPPER = [f"{what}/{shape}/{dtype}/sm_90" for what in ("decode", "ops") for shape in SHAPES
          for dtype in ("bf16", "fp16", "fp32")]  # fmt: skip
AMPERE = [f"{what}/{shape}/bf16/sm_80" for what in ("decode", "ops")
          for shape in ("llama-1b", "qwen3-0.6b")]  # fmt: skip
REFUSED = "plain_call/sm_90"
# Shared memory one block may use (bytes), per compute capability.
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, object]]]:
    """Every case compiled in one worker run (one Triton import): case -> its launches."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))  # a real compile
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the default today; set to quiet its warning
    src = str(Path(__file__).parents[2] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(WORKER), *HOPPER, *AMPERE, REFUSED],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows: dict[str, list[dict[str, object]]] = {}
    for line in proc.stdout.splitlines():
        row = json.loads(line)
        rows.setdefault(str(row["case"]), []).append(row)
    return rows


def check(rows: list[dict[str, object]], capability: int, kernels: set[str]) -> None:
    assert {str(r["kernel"]) for r in rows} == kernels, "every kernel was launched"
    for row in rows:
        assert "error" not in row, f"{row['kernel']}: {row['error']}"
        assert int(row["shared"]) <= SHARED_LIMIT[capability], row  # type: ignore[call-overload]
        # Spilled registers go to local memory, hundreds of cycles a reload, every key.
        assert row["stack"] == 0, f"{row['kernel']} spills: {row}"


DECODE = {"split_kernel", "merge_kernel"}
OPS = {"rms_norm_kernel", "silu_mul_kernel", "rotary_kernel"}


@pytest.mark.parametrize("case", HOPPER + AMPERE)
def test_kernels_compile(compiled: dict[str, list[dict[str, object]]], case: str) -> None:
    rows = compiled[case]
    check(rows, int(case.rsplit("sm_", 1)[1]), DECODE if case.startswith("decode") else OPS)
    if case.startswith("decode"):  # a batch of one (many splits) and a full bucket (one)
        assert len(rows) == 4


def test_the_compiler_refuses_what_the_interpreter_runs(
    compiled: dict[str, list[dict[str, object]]],
) -> None:
    """The check can fail: a kernel calling a plain Python function is reported refused."""
    (row,) = compiled[REFUSED]
    assert "Unsupported function" in str(row.get("error")), row
