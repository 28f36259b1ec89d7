"""The README's main job, as a user runs it: serve the tiny model, run an example
inferlet end to end (`scripts/demo.sh`)."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_demo_serves_and_runs_the_example_inferlet(tiny_dir: Path) -> None:
    from loom import LLM, SamplingParams

    env = {**os.environ, "LOOM_PORT": str(free_port())}
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "demo.sh"), "inferlets/text_completion/app.py",
         "--", "Once upon a time", "8"],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "loom: serving" in out.stderr and "launched" in out.stderr
    # The embedded model is generated deterministically: the same weights as `tiny_dir`.
    llm = LLM(str(tiny_dir), num_pages=16)
    ids = llm.tokenizer.encode("Once upon a time", add_special_tokens=False)
    greedy = SamplingParams(max_tokens=8, temperature=0.0)  # (both end at end-of-sequence)
    assert out.stdout == llm.generate([ids], greedy)[0].text + "\n"
