"""The WIT ``types.sampler`` record, shared by ``forward`` and ``generate``."""

from __future__ import annotations

from loom.runtime.wasm.ffi import F32, U32, U64, option, record

SAMPLER = record(
    ("temperature", F32),
    ("top-k", U32),
    ("top-p", F32),
    ("min-p", F32),
    ("seed", option(U64)),
)
