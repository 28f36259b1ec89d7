"""``loom run | ps | kill`` as a user runs them, against a real server; settings files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loom import LLM, SamplingParams
from loom.client import SyncClient
from tests.server.conftest import API_KEY

ROOT = Path(__file__).resolve().parents[2]


def loom(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LOOM_API_KEY": API_KEY}
    return subprocess.run([sys.executable, "-m", "loom", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)  # fmt: skip


def test_loom_run_builds_uploads_and_prints_the_output(server: Any, tiny_dir: Path) -> None:
    prompt = "Once upon a time"
    out = loom("run", str(ROOT / "inferlets" / "text_completion" / "app.py"),
               "--server", server.url, "--", prompt, "10")  # fmt: skip
    assert out.returncode == 0, out.stderr
    llm = LLM(str(tiny_dir), num_pages=32)
    ids = llm.tokenizer.encode(prompt, add_special_tokens=False)
    # (The inferlet ends at end-of-sequence, as the engine does unless told to ignore it.)
    want = llm.generate([ids], SamplingParams(max_tokens=10, temperature=0.0))[0].text
    assert out.stdout == want + "\n"
    assert "launched" in out.stderr


def test_loom_run_reports_a_failing_inferlet(
    server: Any, sdkkit_wasm: bytes, tmp_path: Path
) -> None:
    wasm = tmp_path / "kit.wasm"
    wasm.write_bytes(sdkkit_wasm)
    out = loom("run", str(wasm), "--server", server.url, "--", "fail")
    assert out.returncode == 1
    assert "boom from the app" in out.stderr
    out = loom("run", str(wasm), "--server", server.url, "--api-key", "wrong", "--", "fail")
    assert out.returncode == 1 and "unauthenticated" in out.stderr
    out = loom("run", str(tmp_path / "missing.py"), "--server", server.url)
    assert out.returncode == 2 and "error" in out.stderr
    out = loom("ps", "--server", "http://127.0.0.1:9")  # nothing listens there
    assert out.returncode == 2 and "cannot reach the server" in out.stderr


def test_loom_ps_and_kill(server: Any, sdkkit_wasm: bytes) -> None:
    with SyncClient(server.url, API_KEY) as c:
        inst = c.launch(c.upload(sdkkit_wasm), ["echo"])
        assert inst.recv(timeout=60) == "ready"
        ps = loom("ps", "--server", server.url)
        assert ps.returncode == 0, ps.stderr
        assert inst.id in ps.stdout and "running" in ps.stdout
        kill = loom("kill", inst.id, "--server", server.url)
        assert kill.returncode == 0, kill.stderr
        assert inst.wait(timeout=60).kind == "terminated"
        again = loom("kill", inst.id, "--server", server.url)
        assert again.returncode == 1 and "not_running" in again.stderr


def test_settings_file_and_flags(tmp_path: Path) -> None:
    from loom.config import ServeConfig

    cfg = tmp_path / "loom.toml"
    cfg.write_text('port = 9001\nmodel = "tiny"\napi_keys = ["a", "b"]\nnum_pages = 64\n')
    s = ServeConfig.load(cfg, {"port": 9100, "host": None})
    got = (s.server.port, s.server.host, s.server.api_keys, s.engine.num_pages)
    assert got == (9100, "127.0.0.1", ("a", "b"), 64)
    cfg.write_text("prot = 1\n")
    with pytest.raises(ValueError, match="unknown setting"):
        ServeConfig.load(cfg, {})
    with pytest.raises(ValueError, match="port"):
        ServeConfig.load(None, {"port": 70000})
    with pytest.raises(ValueError, match="batch policy"):
        ServeConfig.of(batch_policy="sometimes")
    bad = loom("serve", "--config", str(cfg))
    assert bad.returncode == 2 and "unknown setting(s) prot" in bad.stderr


def test_every_setting_is_a_serve_flag_with_its_default_in_the_help() -> None:
    from loom.cli import build_parser
    from loom.config import SERVE_SECTIONS, settings_of

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    serve = sub.choices["serve"]  # type: ignore[attr-defined]
    by_dest = {a.dest: a for a in serve._actions}
    settings = [s for c in SERVE_SECTIONS for s in settings_of(c)]
    assert len(settings) == len({s.name for s in settings})  # one name, one setting
    for s in settings:
        assert s.name in by_dest, s.name
        assert s.flag in by_dest[s.name].option_strings
        if s.default not in (None, ()) and not isinstance(s.default, bool):
            assert f"(default: {s.default})" in by_dest[s.name].help
    assert "--api-key" in by_dest["api_keys"].option_strings  # repeatable, one key each
    args = parser.parse_args(["serve", "--api-key", "a", "--api-key", "b", "--no-prefix-cache",
                              "--http-allow-hosts", "x", "y", "--batch-k", "3"])  # fmt: skip
    assert (args.api_keys, args.prefix_cache, args.http_allow_hosts) == (["a", "b"], False,
                                                                         ["x", "y"])  # fmt: skip
    assert args.batch_k == 3 and args.num_pages is None  # not given: the file's value stands


# Small arguments that exercise each technique inferlet end to end.
TECHNIQUE_RUNS: dict[str, list[str]] = {
    "prefix_caching": ["A shared prefix for every run.", " Question:", "4"],
    "prefix_tree": ["A root prompt.", "2"],
    "best_of_n": ["Once upon a time", "2", "4"],
    "beam_search": ["Once upon a time", "2", "4"],
    "speculative_decoding": ["a b c a b c a b", "8"],
    "jacobi_decoding": ["Once upon a time", "8", "4"],
    "attention_sink": ["Once upon a time", "40", "4", "16"],
    "windowed_attention": ["Once upon a time", "40", "16"],
    "hierarchical_attention": [
        '{"doc": {"text": "A.", "children": [{"text": " B."}]}, "max_tokens": 2}'
    ],
    "tree_of_thought": ['{"depth": 1, "breadth": 2, "keep": 1, "tokens": 2}'],
    "graph_of_thought": ['{"thoughts": 2, "tokens": 2}'],
    "recursion_of_thought": ['{"depth": 1, "fanout": 2, "tokens": 2}'],
    "skeleton_of_thought": ['{"points": 2, "skeleton_tokens": 2, "tokens": 2}'],
    "watermarking": ['{"samples": 2, "batch": 2, "tokens": 4}'],
    "output_validation": ["The capital of France is", " Paris", " Rome"],
}


def test_every_technique_inferlet_runs_with_loom_run(server: Any) -> None:
    """Each technique builds and runs as a user runs it (``loom run inferlets/NAME``) and
    prints its JSON reply."""
    import json

    apps = {p.parent.name for p in (ROOT / "inferlets").glob("*/app.py")}
    assert set(TECHNIQUE_RUNS) <= apps
    for app, args in TECHNIQUE_RUNS.items():
        out = loom("run", str(ROOT / "inferlets" / app), "--server", server.url, "--", *args)
        assert out.returncode == 0, (app, out.stderr[-2000:])
        assert isinstance(json.loads(out.stdout), dict), (app, out.stdout)
