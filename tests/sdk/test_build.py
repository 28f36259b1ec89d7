"""``loom new`` / ``loom build``: starter apps, clear errors, the build cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from loom.cli import main as cli_main
from loom.sdk.build import BuildError, build_inferlet, source_hash
from loom.sdk.scaffold import new_inferlet


def test_a_new_starter_builds_and_streams_its_completion(
    srt: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["new", "hello", "--dir", str(tmp_path)]) == 0
    out = tmp_path / "hello.wasm"
    assert cli_main(["build", str(tmp_path / "hello" / "app.py"), "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    h = srt.launch(srt.add_program(out.read_bytes()), ["Once upon a time"])
    result = h.wait(120)
    assert result.ok, result.error
    messages = []
    while not h.messages.empty():
        messages.append(h.messages.get())
    *pieces, final = messages
    assert pieces and final == "Once upon a time" + "".join(pieces)


def test_new_refuses_bad_names_and_existing_folders(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a valid inferlet name"):
        new_inferlet("no spaces", tmp_path)
    new_inferlet("ok", tmp_path)
    with pytest.raises(FileExistsError):
        new_inferlet("ok", tmp_path)


def test_syntax_errors_name_the_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    app = tmp_path / "broken.py"
    app.write_text("import inferlet\n\nasync def main(args)\n    return None\n")
    with pytest.raises(BuildError, match=r"broken\.py:3: syntax error"):
        build_inferlet(app, cache_dir=tmp_path / "cache")
    assert cli_main(["build", str(app)]) == 2
    assert "broken.py:3: syntax error" in capsys.readouterr().err  # (not the staged app.py)
    folder = tmp_path / "agent"
    folder.mkdir()
    (folder / "app.py").write_text("import util\n\nasync def main(args):\n    return None\n")
    (folder / "util.py").write_text("def f(:\n    pass\n")
    with pytest.raises(BuildError, match=r"agent/util\.py:1: syntax error"):
        build_inferlet(folder, cache_dir=tmp_path / "cache")


def test_a_missing_or_plain_main_is_refused_at_build_time(tmp_path: Path) -> None:
    app = tmp_path / "helper.py"
    app.write_text("import inferlet\n\n\ndef helper():\n    return 1\n")
    with pytest.raises(BuildError, match=r"helper\.py: no entry point: define `async def main"):
        build_inferlet(app, cache_dir=tmp_path / "cache")
    app.write_text("import inferlet\n\n\ndef main(args):\n    return None\n")
    with pytest.raises(BuildError, match=r"helper\.py:4: `main` must be a coroutine"):
        build_inferlet(app, cache_dir=tmp_path / "cache")


def test_a_failed_import_of_native_code_shows_the_python_error(tmp_path: Path) -> None:
    # pydantic_core is compiled code (a dependency of the server, so it is installed).
    app = tmp_path / "native.py"
    app.write_text("import pydantic_core\n\n\nasync def main(args):\n    return None\n")
    with pytest.raises(BuildError) as err:
        build_inferlet(app, cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert "pydantic_core" in message and "Error" in message, message
    assert "native code" in message


def test_imports_that_cannot_work_in_the_sandbox_are_refused(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("import util\n\nasync def main(args):\n    return None\n")
    (tmp_path / "util.py").write_text('"""helpers"""\nfrom socket import create_connection\n')
    with pytest.raises(BuildError, match=r"util\.py:2: `socket` cannot work .*http_get"):
        build_inferlet(tmp_path, cache_dir=tmp_path / "cache")
    (tmp_path / "util.py").write_text("import threading\n")
    with pytest.raises(BuildError, match=r"util\.py:1: `threading`"):
        build_inferlet(tmp_path, cache_dir=tmp_path / "cache")


def test_the_cache_key_follows_the_sources(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("async def main(args):\n    return 'a'\n")
    first = source_hash(tmp_path)
    assert source_hash(tmp_path) == first
    (tmp_path / "helper.py").write_text("X = 1\n")
    second = source_hash(tmp_path)
    assert second != first
    (tmp_path / "app.py").write_text("async def main(args):\n    return 'b'\n")
    assert source_hash(tmp_path) not in (first, second)
    assert source_hash(tmp_path, sdk=False) != source_hash(tmp_path)


def test_a_cached_build_is_reused(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("async def main(args):\n    return 'cached'\n")
    cache = tmp_path / "cache"
    first = build_inferlet(tmp_path, cache_dir=cache)
    stamp = first.stat().st_mtime_ns
    again = build_inferlet(tmp_path, out=tmp_path / "copy.wasm", cache_dir=cache)
    assert first.stat().st_mtime_ns == stamp  # not rebuilt
    assert again.read_bytes() == first.read_bytes()
    assert len(list(cache.glob("*.wasm"))) == 1
