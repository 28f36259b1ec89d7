"""Build a Python inferlet into a component with componentize-py (pinned), cached by hash.

This is the engine behind ``loom build``. An app is one file or a folder with ``app.py``
(plus helper modules); it is compiled together with the SDK (``loom/sdk/guest``: the
``inferlet`` package and the entry module that runs ``main``) against
``loom:inferlet@0.1.0`` with ``--stub-wasi``, so the component imports only the inferlet
API: no filesystem, environment, clock or socket imports exist to grant.

Before the slow compile, every source file is checked natively: a syntax error or an
import that cannot work inside the sandbox fails at once with its file and line.
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from loom.paths import cache_root

COMPONENTIZE_PY_VERSION = "0.25.1"
WIT_DIR = Path(__file__).parent / "wit"
SDK_DIR = Path(__file__).parent / "guest"
SDK_ENTRY = "_loom_entry"
WORLD = "inferlet"

# Modules a sandboxed inferlet cannot use, with what to use instead.
SANDBOX_UNAVAILABLE = {
    "socket": "inferlet.http_get / http_post",
    "ssl": "inferlet.http_get / http_post",
    "urllib.request": "inferlet.http_get / http_post",
    "http.client": "inferlet.http_get / http_post",
    "subprocess": "inferlet.launch",
    "multiprocessing": "inferlet.spawn / inferlet.launch",
    "threading": "inferlet.spawn / inferlet.gather",
    "concurrent": "inferlet.spawn / inferlet.gather",
    "asyncio": "inferlet.gather / inferlet.spawn (the SDK runs its own loop)",
    "select": "inferlet.gather",
    "selectors": "inferlet.gather",
    "signal": None,
    "ctypes": None,
    "mmap": None,
}


class BuildError(Exception):
    """The inferlet did not build; the message says where and why."""


def _componentize_py() -> str:
    local = Path(sys.executable).parent / "componentize-py"
    found = str(local) if local.exists() else shutil.which("componentize-py")
    if found is None:
        raise BuildError(
            f"componentize-py is not installed (pip install componentize-py=="
            f"{COMPONENTIZE_PY_VERSION})"
        )
    return found


def _sources(root: Path) -> list[Path]:
    return sorted(
        p for p in root.rglob("*") if p.suffix in (".py", ".wit") and "__pycache__" not in p.parts
    )


def source_hash(app_dir: Path, *, sdk: bool = True) -> str:
    """Hash of every .py file of the app (and the SDK), the WIT package and the toolchain."""
    h = hashlib.sha256(COMPONENTIZE_PY_VERSION.encode())
    for root in (app_dir, WIT_DIR, *((SDK_DIR,) if sdk else ())):
        h.update(b"\0" + root.name.encode())
        for path in _sources(root):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def check_sources(app_dir: Path, shown: Path | None = None) -> None:
    """Syntax errors, sandbox-incompatible imports and a missing or non-async ``main``,
    with file and line. ``shown``: how to name the app in messages (the file or folder
    the user gave; a single file is staged as ``app.py``)."""
    for path in sorted(app_dir.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        rel = path.relative_to(app_dir)
        entry = rel == Path("app.py")
        if shown is not None:
            rel = shown if shown.suffix == ".py" and entry else shown / rel
        src = path.read_text(encoding="utf-8")
        try:
            tree = ast.parse(src, filename=str(rel))
        except SyntaxError as e:
            raise BuildError(f"{rel}:{e.lineno}: syntax error: {e.msg}") from None
        if entry:
            check_main(tree, str(rel))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                bad = next(
                    (m for m in SANDBOX_UNAVAILABLE if name == m or name.startswith(m + ".")),
                    None,
                )
                if bad is not None:
                    hint = SANDBOX_UNAVAILABLE[bad]
                    line = getattr(node, "lineno", 0)
                    raise BuildError(
                        f"{rel}:{line}: `{bad}` cannot work inside the inferlet sandbox"
                        + (f"; use {hint}" if hint else "")
                    )


def check_main(tree: ast.Module, name: str) -> None:
    """The entry module must define ``async def main(args)`` (or import a ``main``)."""
    for node in tree.body:
        if isinstance(node, ast.AsyncFunctionDef) and node.name == "main":
            return
        if isinstance(node, ast.FunctionDef) and node.name == "main":
            raise BuildError(
                f"{name}:{node.lineno}: `main` must be a coroutine: "
                "`async def main(args: list[str]) -> str | None`"
            )
        imported = isinstance(node, ast.ImportFrom) and any(
            (a.asname or a.name) == "main" for a in node.names
        )
        assigned = isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "main" for t in node.targets
        )
        if imported or assigned:
            return  # (defined elsewhere: checked when it runs)
    raise BuildError(
        f"{name}: no entry point: define `async def main(args: list[str]) -> str | None`"
    )


def build_cache_dir() -> Path:
    return cache_root() / "builds"


def build_inferlet(
    app: Path,
    out: Path | None = None,
    cache_dir: Path | None = None,
    *,
    sdk: bool = True,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Compile the inferlet at ``app`` (a ``.py`` file, or a folder with ``app.py``).

    ``sdk=True`` (an SDK app: ``async def main``) bundles the SDK and its entry module;
    ``sdk=False`` builds an app on the raw bindings whose ``app.py`` defines ``WitWorld``.
    Returns the .wasm path (the cache entry, or ``out``)."""
    app = Path(app)
    if app.suffix in (".c", ".zig"):
        return build_native(app, out, cache_dir, progress=progress)
    with tempfile.TemporaryDirectory(prefix="loom-build-") as staging:
        if app.is_file():
            if app.suffix != ".py":
                raise BuildError(f"{app} is not a Python file")
            app_dir = Path(staging) / "app"
            app_dir.mkdir()
            shutil.copyfile(app, app_dir / "app.py")
        elif (app / "app.py").is_file():
            app_dir = app
        else:
            raise BuildError(f"{app} is neither a .py file nor a folder with app.py")
        if sdk:
            check_sources(app_dir, app)
        cache = (cache_dir or build_cache_dir()) / f"{source_hash(app_dir, sdk=sdk)}.wasm"
        if not cache.exists():
            _compile(app_dir, cache, sdk, progress)
    if out is None:
        return cache
    shutil.copyfile(cache, out)
    return Path(out)


def _compile(app_dir: Path, cache: Path, sdk: bool, progress: Callable[[str], None] | None) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".wasm.tmp")
    os.close(fd)
    paths = ["-p", str(app_dir)] + (["-p", str(SDK_DIR)] if sdk else [])
    cmd = [
        _componentize_py(), "-d", str(WIT_DIR), "-w", WORLD, "componentize", "--stub-wasi",
        *paths, SDK_ENTRY if sdk else "app", "-o", tmp,
    ]  # fmt: skip
    if progress is not None:
        progress("compiling with componentize-py (about 10 s; cached afterwards)")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        Path(tmp).unlink(missing_ok=True)
        raise BuildError("componentize-py failed:\n" + componentize_error(proc.stderr))
    os.replace(tmp, cache)
    if progress is not None:
        progress(f"compiled in {time.perf_counter() - t0:.1f} s")


def componentize_error(stderr: str) -> str:
    """What to show of a failed componentize-py run: the Python exception that stopped
    it (an import of a package with native code, say), ahead of the Rust backtrace that
    follows it; else the last lines."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    exc = re.compile(r"^\s*(\w+\.)*\w*(Error|Exception)\b.*:")
    found = [i for i, ln in enumerate(lines) if exc.match(ln)]
    if not found:
        return "\n".join(lines[-20:])
    last = found[-1]
    start = next((i for i in range(last, -1, -1) if lines[i].startswith("Traceback")), last)
    shown = lines[start : last + 1]
    if len(shown) > 20:
        shown = [*shown[:2], "  ...", *shown[-17:]]
    hint = ""
    if "ModuleNotFoundError" in lines[last] or "ImportError" in lines[last]:
        hint = (
            "\n(inferlets run in a WebAssembly sandbox: pure-Python packages can be bundled "
            "next to app.py; packages with native code cannot)"
        )
    return "\n".join(shown) + hint


C_HEADER_DIR = Path(__file__).parent / "c"
ZIGLANG_VERSION = "0.17.1"


def build_native(
    src: Path,
    out: Path | None = None,
    cache_dir: Path | None = None,
    *,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Compile a C (``.c``) or Zig (``.zig``) inferlet to a freestanding core module with
    the ``ziglang`` toolchain from the Python index; cached by content hash."""
    src = Path(src).resolve()
    if not src.is_file():
        raise BuildError(f"{src} does not exist")
    h = hashlib.sha256(f"native-{ZIGLANG_VERSION}".encode())
    h.update(src.read_bytes())
    h.update((C_HEADER_DIR / "loom.h").read_bytes())
    cache = (cache_dir or build_cache_dir()) / f"{h.hexdigest()}.wasm"
    if not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".wasm")
        os.close(fd)
        zig = [sys.executable, "-m", "ziglang"]
        if src.suffix == ".c":
            cmd = [*zig, "cc", "--target=wasm32-freestanding", "-nostdlib", "-O2",
                   "-Wl,--no-entry", "-I", str(C_HEADER_DIR), str(src), "-o", tmp]  # fmt: skip
        else:
            cmd = [*zig, "build-exe", str(src), "-target", "wasm32-freestanding", "-fno-entry",
                   "-rdynamic", "-O", "ReleaseSmall", "-I", str(C_HEADER_DIR),
                   f"-femit-bin={tmp}"]  # fmt: skip
        if progress is not None:
            progress(f"compiling {src.name} with zig {ZIGLANG_VERSION}")
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=src.parent)
        if proc.returncode != 0:
            Path(tmp).unlink(missing_ok=True)
            if "No module named ziglang" in proc.stderr:
                raise BuildError(
                    "native inferlets need the zig toolchain: "
                    f"pip install ziglang=={ZIGLANG_VERSION}"
                )
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            raise BuildError("compiling failed:\n" + "\n".join(lines[-20:]))
        os.replace(tmp, cache)
    if out is None:
        return cache
    shutil.copyfile(cache, out)
    return Path(out)
