"""The wasmtime engines instances run in: one where each instance maps its own memory,
and with the instance pool (``RuntimeConfig.instance_pool``) a second whose instances
take reused slots (``wasm/engine.InstancePool``). The pooled one takes new instances while
it has a free slot, the other the rest: the pool's resident memory stays bounded
(``pool_slots`` x ``pool_resident_mb``) however many instances run.

Both engines have the same memory reservation, so a program compiles once: the pooled
one takes the own one's compiled program in memory (``ProgramCache.load_from``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from loom.config import RuntimeConfig
from loom.runtime.program_cache import ProgramCache
from loom.runtime.wasm.engine import InstancePool, WasmError
from loom.runtime.wasm.ffi import (
    ComponentLinker,
    CoreLinker,
    GuestStore,
    StoresToFree,
    WasmEngine,
)

log = logging.getLogger(__name__)


@dataclass
class WasmSide:
    """One engine with its compiled programs and the host functions linked for it."""

    engine: WasmEngine
    programs: ProgramCache
    linker: ComponentLinker
    core_linker: CoreLinker


def instance_pool(config: RuntimeConfig) -> InstancePool | None:
    """The pool: ``pool_slots`` slots (ended instances' stores not yet freed hold theirs),
    each memory slot as large as the per-instance memory cap. None when it is off."""
    if not config.instance_pool:
        return None
    return InstancePool(
        instances=config.pool_slots,
        memory_bytes=config.memory_limit_bytes,
        keep_resident_bytes=config.pool_resident_mb << 20,
    )


class GuestEngines:
    """The own-memory engine (``own``) and, with the pool on and its slots reservable,
    the pooled one (``pooled``); ``new_store`` picks one for each new instance."""

    def __init__(self, config: RuntimeConfig, cache_dir: Path | None) -> None:
        pool = instance_pool(config)
        if pool is not None and not pool.fits():
            pool = None
        reservation = config.memory_limit_bytes if pool is not None else 64 << 20
        self.own = self._side(WasmEngine(memory_reservation=reservation), cache_dir)
        self.pooled = self._side(WasmEngine(pool=pool), cache_dir) if pool else None
        self.slots = pool.instances if pool is not None else 0
        self.pooled_stores = 0  # stores of the pooled engine not yet freed
        self.unpooled: set[str] = set()  # programs the pooled engine refused

    @staticmethod
    def _side(engine: WasmEngine, cache_dir: Path | None) -> WasmSide:
        return WasmSide(engine, ProgramCache(engine, cache_dir), ComponentLinker(engine),
                        CoreLinker(engine))  # fmt: skip

    def sides(self) -> Iterator[WasmSide]:
        yield self.own
        if self.pooled is not None:
            yield self.pooled

    def increment_epoch(self) -> None:
        """A tick of the epoch clock, in every engine (a guest's slice ends at one)."""
        for side in self.sides():
            side.engine.increment_epoch()

    def add(self, wasm: bytes) -> str:
        """Compile (or load) a program for every engine; its hash. A program beyond the
        pool's limits per instance (more memories or tables than ``InstancePool``'s) runs
        in the own-memory engine only."""
        h = self.own.programs.add(wasm)
        pooled = self.pooled
        if pooled is not None and h not in pooled.programs and h not in self.unpooled:
            try:
                pooled.programs.load_from(self.own.programs, h)
            except WasmError as e:
                self.unpooled.add(h)
                log.info("program %s runs without the instance pool: %s", h[:12], e)
        return h

    def new_store(
        self, program: str, memory_limit: int, ended: StoresToFree | None = None
    ) -> tuple[WasmSide, GuestStore]:
        """A store for a new instance of ``program``: in the pooled engine while a slot
        is free. A slot an ended instance's store still holds (in ``ended``) is freed for
        it at once: that costs what freeing it later would, and saves it its faults."""
        side = self.pooled if program not in self.unpooled else None
        if side is not None and self.pooled_stores >= self.slots and ended is not None:
            ended.free_pooled()
        if side is None or self.pooled_stores >= self.slots:
            side = self.own
            return side, GuestStore(side.engine, memory_limit=memory_limit, slice_ticks=1)
        self.pooled_stores += 1
        store = GuestStore(side.engine, memory_limit=memory_limit, slice_ticks=1,
                           on_close=self._slot_freed)  # fmt: skip
        return side, store

    def _slot_freed(self) -> None:
        self.pooled_stores -= 1
