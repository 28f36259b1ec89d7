"""Programs (components) compiled once and cached on disk by content hash.

Compiling a componentize-py component takes 4–10 s; deserializing the compiled artifact
takes tens of milliseconds. Artifacts are keyed by the program's sha256, the wasmtime
version (a compiled artifact only loads in the release that made it) and the engine's
memory reservation (the code depends on it), and written atomically, so concurrent
servers sharing a cache never see half a file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import wasmtime
from wasmtime.component import Component

from loom.paths import cache_root
from loom.runtime.wasm.ffi import WASMTIME_VERSION, WasmEngine, WasmError


def is_core_module(wasm: bytes) -> bool:
    """A core module (version 1), as opposed to a component (a different layer/version)."""
    return wasm[:8] == b"\0asm\x01\x00\x00\x00"


def program_hash(wasm: bytes) -> str:
    return hashlib.sha256(wasm).hexdigest()


def default_cache_dir() -> Path:
    return cache_root() / "programs"


class ProgramCache:
    def __init__(self, engine: WasmEngine, cache_dir: Path | None = None) -> None:
        self.engine = engine
        self.dir = cache_dir or default_cache_dir()
        self._loaded: dict[str, Component | wasmtime.Module] = {}

    def add(self, wasm: bytes) -> str:
        """Compile (or load the cached compile of) a program; returns its hash.

        A component is a Python (or other component) inferlet; a core module is a C/Zig
        inferlet on the plain C ABI (compiling one takes milliseconds: not cached)."""
        h = program_hash(wasm)
        if h in self._loaded:
            return h
        if is_core_module(wasm):
            try:
                self._loaded[h] = wasmtime.Module(self.engine.engine, wasm)
            except wasmtime.WasmtimeError as e:
                raise WasmError(f"not a valid WebAssembly module: {e}") from None
            return h
        tag = self.engine.artifact_tag
        path = self.dir / f"{h}-wasmtime{WASMTIME_VERSION}-{tag}.cwasm"
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

    def load_from(self, other: ProgramCache, h: str) -> None:
        """Take program ``h`` as ``other`` compiled it (its engine has the same memory
        reservation), without compiling again; WasmError when this engine refuses it."""
        program = other._loaded[h]
        try:
            if isinstance(program, wasmtime.Module):
                data = program.serialize()
                self._loaded[h] = wasmtime.Module.deserialize(self.engine.engine, data)
            else:
                self._loaded[h] = self.engine.deserialize(other.engine.serialize(program))
        except wasmtime.WasmtimeError as e:
            raise WasmError(str(e).splitlines()[0]) from None

    def get(self, h: str) -> Component:
        comp = self._loaded.get(h)
        if not isinstance(comp, Component):
            raise WasmError(f"no component program with hash {h}")
        return comp

    def get_core(self, h: str) -> wasmtime.Module:
        module = self._loaded.get(h)
        if not isinstance(module, wasmtime.Module):
            raise WasmError(f"no core-module program with hash {h}")
        return module

    def is_core(self, h: str) -> bool:
        return isinstance(self._loaded.get(h), wasmtime.Module)

    def __contains__(self, h: str) -> bool:
        return h in self._loaded
