"""The ``loom`` command line, run as a real subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path


def loom(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loom", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_generate_streams_text_from_a_model(tiny_dir: Path) -> None:
    from loom import LLM, SamplingParams

    res = loom("generate", "--model", str(tiny_dir), "--max-tokens", "12", "Once upon a time")
    assert res.returncode == 0, res.stderr
    want = (
        LLM(str(tiny_dir))
        .generate("Once upon a time", SamplingParams(max_tokens=12, temperature=0.0))[0]
        .text
    )
    assert res.stdout == want + "\n" and want


def test_make_tiny_and_info(tmp_path: Path) -> None:
    res = loom("model", "make-tiny", "--out", str(tmp_path / "m"), "--seed", "3")
    assert res.returncode == 0, res.stderr
    res = loom("model", "info", str(tmp_path / "m"), "--json")
    info = json.loads(res.stdout)
    assert info["architecture"] == "LlamaForCausalLM" and info["num_layers"] == 4
    assert 1_000_000 < info["num_params"] < 1_500_000


def test_errors_are_clear_and_exit_nonzero(tmp_path: Path) -> None:
    res = loom("generate", "--model", str(tmp_path / "nope"), "hi")
    assert res.returncode == 2 and "does not exist" in res.stderr
    res = loom("generate", "--temperature", "-1", "hi")
    assert res.returncode == 2 and "temperature" in res.stderr
    res = loom("frobnicate")
    assert res.returncode == 2 and "invalid choice" in res.stderr


def test_serve_stops_cleanly_on_sigterm(tiny_dir: Path) -> None:
    """SIGTERM (what service managers send) ends `loom serve` with status 0, its engine
    worker process with it, and nothing on stderr after the start-up lines."""
    import signal
    import socket
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "loom", "serve", "--model", str(tiny_dir), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.3)
        children_file = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        workers = [int(p) for p in children_file.read_text().split()]
        assert workers, "no engine worker process"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert err.rstrip().splitlines()[-1].startswith("loom: serving"), err

    # The children (the engine worker, multiprocessing's resource tracker) see the pipe to
    # the server close when it exits and end then, a moment later: allow them that moment.
    def alive(pid: int) -> bool:
        try:
            return "zombie" not in Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if alive(pid)], "a child outlived the server"
