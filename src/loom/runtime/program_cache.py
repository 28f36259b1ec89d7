"""Programs (components) compiled once and cached on disk by content hash.

Compiling a componentize-py component takes 4–10 s; deserializing the compiled artifact
takes tens of milliseconds. Artifacts are keyed by the program's sha256 and the wasmtime
version (a compiled artifact only loads in the release that made it) and written
atomically, so concurrent servers sharing a cache never see half a file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from wasmtime.component import Component

from loom.paths import cache_root
from loom.runtime.wasm_ffi import WASMTIME_VERSION, WasmEngine, WasmError


def program_hash(wasm: bytes) -> str:
    return hashlib.sha256(wasm).hexdigest()


def default_cache_dir() -> Path:
    return cache_root() / "programs"


class ProgramCache:
    def __init__(self, engine: WasmEngine, cache_dir: Path | None = None) -> None:
        self.engine = engine
        self.dir = cache_dir or default_cache_dir()
        self._loaded: dict[str, Component] = {}

    def add(self, wasm: bytes) -> str:
        """Compile (or load the cached compile of) a program; returns its hash."""
        h = program_hash(wasm)
        if h in self._loaded:
            return h
        path = self.dir / f"{h}-wasmtime{WASMTIME_VERSION}.cwasm"
        if path.exists():
            try:
                self._loaded[h] = self.engine.deserialize(path.read_bytes())
                return h
            except Exception:
                path.unlink(missing_ok=True)  # stale or damaged: compile again
        component = self.engine.compile(wasm)
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(self.engine.serialize(component))
        os.replace(tmp, path)
        self._loaded[h] = component
        return h

    def get(self, h: str) -> Component:
        comp = self._loaded.get(h)
        if comp is None:
            raise WasmError(f"no program with hash {h}")
        return comp

    def __contains__(self, h: str) -> bool:
        return h in self._loaded
