"""Build a Python inferlet into a component with componentize-py (pinned), cached by hash.

This is the engine behind ``loom build``: the app folder (``app.py`` plus helper modules)
is compiled against ``loom:inferlet@0.1.0`` with ``--stub-wasi``, so the component imports
only the inferlet API: no filesystem, environment, clock or socket imports exist to grant.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from loom.paths import cache_root

COMPONENTIZE_PY_VERSION = "0.25.1"
WIT_DIR = Path(__file__).parent / "wit"
WORLD = "inferlet"


class BuildError(Exception):
    """The inferlet did not build; the message carries componentize-py's explanation."""


def _componentize_py() -> str:
    local = Path(sys.executable).parent / "componentize-py"
    found = str(local) if local.exists() else shutil.which("componentize-py")
    if found is None:
        raise BuildError(
            f"componentize-py is not installed (pip install componentize-py=="
            f"{COMPONENTIZE_PY_VERSION})"
        )
    return found


def source_hash(app_dir: Path) -> str:
    """Hash of every .py file of the app, the WIT package and the toolchain version."""
    h = hashlib.sha256(COMPONENTIZE_PY_VERSION.encode())
    for root in (app_dir, WIT_DIR):
        for path in sorted(root.rglob("*")):
            if path.suffix in (".py", ".wit") and "__pycache__" not in path.parts:
                h.update(str(path.relative_to(root)).encode())
                h.update(path.read_bytes())
    return h.hexdigest()


def build_cache_dir() -> Path:
    return cache_root() / "builds"


def build_inferlet(app_dir: Path, out: Path | None = None, cache_dir: Path | None = None) -> Path:
    """Compile the inferlet in ``app_dir`` (with ``app.py``); returns the .wasm path."""
    app_dir = Path(app_dir)
    if not (app_dir / "app.py").is_file():
        raise BuildError(f"{app_dir} has no app.py")
    cache = (cache_dir or build_cache_dir()) / f"{source_hash(app_dir)}.wasm"
    if not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".wasm.tmp")
        os.close(fd)
        cmd = [
            _componentize_py(), "-d", str(WIT_DIR), "-w", WORLD, "componentize", "--stub-wasi",
            "-p", str(app_dir), "app", "-o", tmp,
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            Path(tmp).unlink(missing_ok=True)
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            raise BuildError("componentize-py failed:\n" + "\n".join(lines[-20:]))
        os.replace(tmp, cache)
    if out is None:
        return cache
    shutil.copyfile(cache, out)
    return Path(out)
