"""The wasmtime engine shared by every inferlet, and wasmtime's errors as ``WasmError``."""

from __future__ import annotations

import ctypes
from ctypes import POINTER
from typing import Any

import wasmtime
from wasmtime import _ffi as ffi
from wasmtime.component import Component

WASMTIME_VERSION = "50.0.1"  # the private bindings of this package are checked against it


class WasmError(Exception):
    """A wasmtime failure (compile, link, instantiate) or a guest trap."""


def raise_error(err: Any, what: str) -> None:
    """Raise for a non-null ``wasmtime_error_t*`` (a typed pointer or a plain address)."""
    if err:
        if isinstance(err, int):
            err = ctypes.cast(err, POINTER(ffi.wasmtime_error_t))
        raise WasmError(f"{what}: {wasmtime.WasmtimeError._from_ptr(err)}")


def error_text(err: Any) -> str:
    return str(wasmtime.WasmtimeError._from_ptr(err))


def trap_summary(err: str) -> str:
    """The first line and the cause of a wasmtime error (the backtrace is noise to users)."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    cause = ""
    if "Caused by:" in err:
        cause = err.split("Caused by:", 1)[1].strip().splitlines()[0].strip()
    head = lines[0] if lines else err
    if "wasm backtrace" in head:
        head = "the inferlet trapped"
    return f"{head}: {cause}" if cause else head


class WasmEngine:
    """One wasmtime engine for every inferlet of a server.

    ``memory_reservation`` shrinks the 4 GiB virtual reservation per linear memory so that
    thousands of instances fit; memories beyond it are moved when they grow.
    """

    def __init__(self, *, memory_reservation: int = 64 << 20, epoch_interruption: bool = True):
        cfg = wasmtime.Config()
        cfg.epoch_interruption = epoch_interruption
        ffi.wasmtime_config_memory_reservation_set(cfg.ptr(), memory_reservation)
        ffi.wasmtime_config_memory_guard_size_set(cfg.ptr(), 64 << 10)
        self.engine = wasmtime.Engine(cfg)

    def compile(self, wasm: bytes) -> Component:
        try:
            return Component(self.engine, wasm)
        except wasmtime.WasmtimeError as e:
            raise WasmError(f"not a valid component: {e}") from None

    def serialize(self, component: Component) -> bytes:
        return bytes(component.serialize())

    def deserialize(self, data: bytes) -> Component:
        return Component.deserialize(self.engine, data)

    def increment_epoch(self) -> None:
        self.engine.increment_epoch()
