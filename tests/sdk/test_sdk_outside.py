"""The SDK outside a built inferlet: ``import inferlet`` works in the project's venv
(editors, type checkers), and a call into the host says it needs a built inferlet."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_the_sdk_imports_in_the_venv_and_names_where_host_calls_run(tmp_path: Path) -> None:
    code = "import inferlet\nprint(inferlet.Context.__name__)\ninferlet.get_model()\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, timeout=60)  # fmt: skip
    assert out.stdout == "Context\n", out.stderr
    assert out.returncode == 1 and "exists only inside a built inferlet" in out.stderr


def test_mypy_checks_an_inferlet_against_the_sdks_types(tmp_path: Path) -> None:
    app = tmp_path / "app.py"
    app.write_text(
        "import inferlet\n\n\nasync def main(args: list[str]) -> str | None:\n"
        "    ctx = inferlet.get_model().create_context()\n"
        "    ctx.fill(3)\n"
        "    return await ctx.generate(max_tokens=4)\n"
    )
    out = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", str(app)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)  # fmt: skip
    assert out.returncode == 1, out.stdout + out.stderr
    assert 'Argument 1 to "fill" of "Context" has incompatible type "int"' in out.stdout
    assert "Found 1 error" in out.stdout  # (and none in the SDK's own sources)
