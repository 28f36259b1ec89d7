"""The wasmtime engine shared by every inferlet, and wasmtime's errors as ``WasmError``."""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
from ctypes import POINTER
from dataclasses import dataclass
from typing import Any

import wasmtime
from wasmtime import _ffi as ffi
from wasmtime.component import Component

WASMTIME_VERSION = "50.0.1"  # the private bindings of this package are checked against it
log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class InstancePool:
    """Sizes of wasmtime's pooling allocator, where instances' memories, tables and fiber
    stacks come from slots reserved once and reused.

    Why: a fresh instance maps its memory copy-on-write from the program's image, and a
    Python inferlet's start then writes ~500 pages of it, one page fault each (measured:
    over half of its start, ~2 ms of ~3.5). A reused slot keeps the first
    ``keep_resident_bytes`` of its memory resident and is reset in place, so the next
    instance of the same program finds those pages already there. The cost: each slot
    once used keeps its resident part (up to 16 MiB for a Python inferlet): the pool is small.
    """

    instances: int  # component (and core) instances alive at once: one slot each
    memory_bytes: int  # the largest a linear memory may grow: the per-instance cap
    keep_resident_bytes: int = 16 << 20

    # Per component: componentize-py's components hold 38 core instances, 2 tables and
    # 1 memory (a program beyond these is refused when it is compiled, with the reason).
    CORE_INSTANCES = 64
    TABLES = 4
    MEMORIES = 2
    TABLE_ELEMENTS = 100_000

    def address_space(self) -> int:
        """Bytes of address space its slots reserve (an estimate from above)."""
        memories = self.instances * self.MEMORIES * (self.memory_bytes + (64 << 10))
        tables = self.instances * self.TABLES * self.TABLE_ELEMENTS * 8
        return (memories + tables + self.instances * (4 << 20)) * 5 // 4

    def fits(self) -> bool:
        """Whether the slots can be reserved (wasmtime aborts the process when they
        cannot): a trial reservation of their size, with no memory behind it."""
        size = self.address_space()
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]  # fmt: skip
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0x4000)
        addr = libc.mmap(None, size, 0, flags, -1, 0)  # (PROT_NONE)
        if addr in (None, ctypes.c_void_p(-1).value):
            log.warning("instances are not pooled: %d GiB of address space for the pool's "
                        "slots cannot be reserved (%s)", size >> 30,
                        os.strerror(ctypes.get_errno()))  # fmt: skip
            return False
        libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))
        return True


def _pooling_config(pool: InstancePool) -> Any:
    p = ffi.wasmtime_pooling_allocation_config_new()
    n = pool.instances
    ffi.wasmtime_pooling_allocation_config_total_component_instances_set(p, n)
    ffi.wasmtime_pooling_allocation_config_total_core_instances_set(p, n * pool.CORE_INSTANCES)
    ffi.wasmtime_pooling_allocation_config_total_memories_set(p, n * pool.MEMORIES)
    ffi.wasmtime_pooling_allocation_config_total_tables_set(p, n * pool.TABLES)
    ffi.wasmtime_pooling_allocation_config_total_stacks_set(p, n)
    ffi.wasmtime_pooling_allocation_config_max_memory_size_set(p, pool.memory_bytes)
    ffi.wasmtime_pooling_allocation_config_table_elements_set(p, pool.TABLE_ELEMENTS)
    ffi.wasmtime_pooling_allocation_config_max_core_instances_per_component_set(
        p, pool.CORE_INSTANCES
    )
    ffi.wasmtime_pooling_allocation_config_max_memories_per_component_set(p, pool.MEMORIES)
    ffi.wasmtime_pooling_allocation_config_max_tables_per_component_set(p, pool.TABLES)
    ffi.wasmtime_pooling_allocation_config_max_unused_warm_slots_set(p, n)
    keep = pool.keep_resident_bytes
    ffi.wasmtime_pooling_allocation_config_linear_memory_keep_resident_set(p, keep)
    ffi.wasmtime_pooling_allocation_config_table_keep_resident_set(p, min(keep, 1 << 20))
    ffi.wasmtime_pooling_allocation_config_async_stack_keep_resident_set(p, min(keep, 1 << 20))
    return p


class WasmEngine:
    """One wasmtime engine for inferlets.

    ``memory_reservation`` shrinks the 4 GiB virtual reservation per linear memory so that
    thousands of instances fit; memories beyond it are moved when they grow. ``pool``:
    instances take pooled slots (``InstancePool``; check ``pool.fits()`` first), each
    memory reserving ``pool.memory_bytes``, which is then the reservation. Compiled code
    depends on the reservation alone: engines with the same one load each other's
    artifacts (``artifact_tag``).
    """

    def __init__(
        self,
        *,
        memory_reservation: int = 64 << 20,
        epoch_interruption: bool = True,
        pool: InstancePool | None = None,
    ):
        reservation = pool.memory_bytes if pool is not None else memory_reservation
        cfg = wasmtime.Config()
        cfg.epoch_interruption = epoch_interruption
        ffi.wasmtime_config_memory_reservation_set(cfg.ptr(), reservation)
        ffi.wasmtime_config_memory_guard_size_set(cfg.ptr(), 64 << 10)
        if pool is not None:
            pooling = _pooling_config(pool)
            ffi.wasmtime_pooling_allocation_strategy_set(cfg.ptr(), pooling)  # (a copy)
            ffi.wasmtime_pooling_allocation_config_delete(pooling)
        self.engine = wasmtime.Engine(cfg)
        self.pooled = pool is not None
        self.artifact_tag = f"r{reservation >> 20}m"

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
