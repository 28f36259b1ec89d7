"""The instance pool (wasmtime's pooling allocator): slots reused and reset, its limits,
the fallback when the address space cannot be reserved, and the runtime freeing ended
instances' stores while idle."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import wasmtime

from loom.runtime.wasm import ffi as wasm_ffi
from loom.runtime.wasm.engine import InstancePool
from tests.runtime_helpers import run_inferlet

# A memory whose first word starts at 7 (a data segment, as a program's image); ``poke``
# writes it and ``peek`` reads it.
MODULE = """
(module
  (memory 1)
  (data (i32.const 0) "\\07")
  (func (export "poke") (param $v i32) (result i32)
    (i32.store (i32.const 0) (local.get $v)) (i32.const 0))
  (func (export "peek") (param i32) (result i32)
    (i32.load (i32.const 0))))
"""


def _call(linker: wasm_ffi.CoreLinker, store: wasm_ffi.GuestStore, inst: object, name: str,
          arg: int) -> int:  # fmt: skip
    fut = linker.call_async(store, inst, name, arg)
    while not fut.poll():
        pass
    assert fut.error() is None
    return int(fut.results[0].of.i32)


def test_a_reused_slot_starts_from_the_programs_image() -> None:
    """An ended instance's slot goes to the next one reset: nothing it wrote is seen (the
    slot's pages stay resident, rewritten in place)."""
    engine = wasm_ffi.WasmEngine(pool=InstancePool(instances=2, memory_bytes=1 << 20))
    assert engine.pooled
    linker = wasm_ffi.CoreLinker(engine)
    module = wasmtime.Module(engine.engine, MODULE)
    for _ in range(5):
        store = wasm_ffi.GuestStore(engine, memory_limit=1 << 20)
        inst = linker.instantiate(store, module)
        assert _call(linker, store, inst, "peek", 0) == 7
        _call(linker, store, inst, "poke", 12345)
        assert _call(linker, store, inst, "peek", 0) == 12345
        store.close()


def test_instances_beyond_the_pool_are_refused_until_a_slot_is_freed() -> None:
    # One instance slot: two memory slots, which two one-memory modules take.
    engine = wasm_ffi.WasmEngine(pool=InstancePool(instances=1, memory_bytes=1 << 20))
    linker = wasm_ffi.CoreLinker(engine)
    module = wasmtime.Module(engine.engine, MODULE)
    stores = [wasm_ffi.GuestStore(engine, memory_limit=1 << 20) for _ in range(3)]
    linker.instantiate(stores[0], module)
    linker.instantiate(stores[1], module)
    with pytest.raises(wasm_ffi.WasmError, match="concurrent"):
        linker.instantiate(stores[2], module)
    stores[0].close()
    inst = linker.instantiate(stores[2], module)
    assert _call(linker, stores[2], inst, "peek", 0) == 7


def test_a_pool_the_address_space_cannot_hold_is_not_made() -> None:
    from loom.config import RuntimeConfig
    from loom.runtime.guest_engines import GuestEngines

    assert InstancePool(instances=4, memory_bytes=1 << 20).fits()
    # 32 slots of 4 TiB memories: beyond a 47-bit address space.
    config = RuntimeConfig(memory_limit_mb=1 << 22)
    assert not InstancePool(instances=32, memory_bytes=config.memory_limit_bytes).fits()
    engines = GuestEngines(config, None)
    assert engines.pooled is None and list(engines.sides()) == [engines.own]
    side, store = engines.new_store("any", 1 << 20)
    assert side is engines.own and not side.engine.pooled
    linker = wasm_ffi.CoreLinker(side.engine)
    inst = linker.instantiate(store, wasmtime.Module(side.engine.engine, MODULE))
    assert _call(linker, store, inst, "peek", 0) == 7


def _until_freed(rt: Any) -> None:
    deadline = time.monotonic() + 10
    while rt.query(lambda: len(rt.guests.to_close)) and time.monotonic() < deadline:
        time.sleep(0.01)


def test_ended_stores_are_freed_while_the_runtime_is_idle(rt: object, testkit: str) -> None:
    """An instance's end is reported before its store is freed; the store is freed in the
    runtime's next idle moments."""
    assert rt.engines.pooled is not None  # type: ignore[attr-defined]  # (on by default)
    handles = [rt.launch(testkit, ["hello"]) for _ in range(6)]  # type: ignore[attr-defined]
    assert all(h.wait(60).ok for h in handles)
    _until_freed(rt)
    assert rt.query(lambda: len(rt.guests.to_close)) == 0  # type: ignore[attr-defined]


def test_instances_beyond_the_pools_slots_run_in_their_own_memory(
    tiny_dir: Path, program_cache: Path, testkit_wasm: bytes
) -> None:
    from loom.config import EngineConfig, RuntimeConfig
    from loom.runtime.runtime import start_runtime

    rt = start_runtime(EngineConfig(model=str(tiny_dir), num_pages=96),
                       RuntimeConfig(pool_slots=4), worker_mode="thread",
                       cache_dir=program_cache)  # fmt: skip
    try:
        engines = rt.engines
        assert engines.pooled is not None and engines.slots == 4
        program = rt.add_program(testkit_wasm)
        for _ in range(3):  # 8 at once, 4 in pooled slots (reused each round), 4 not
            _until_freed(rt)
            handles = [rt.launch(program, ["echo"]) for _ in range(8)]
            sides = rt.query(lambda: [i.side for i in rt.guests.instances.values()])
            assert sum(s is engines.pooled for s in sides) == 4
            assert sum(s is engines.own for s in sides) == 4
            for h in handles:
                h.send("x")
            assert all(h.wait(60).ok and h.recv(5) == "echo:x" for h in handles)
            outs = [json.loads(rt.launch(program, ["decode", "5,6,7", "3"]).recv(60))
                    for _ in range(2)]  # fmt: skip
            assert outs[0] == outs[1]
        result, messages = run_inferlet(rt, program, "hello")
        assert result.ok and messages == [f"hello from {result.instance_id}"]
    finally:
        rt.close()


def test_pool_settings_are_checked(tmp_path: Path) -> None:
    from loom.config import RuntimeConfig
    from loom.runtime.guest_engines import instance_pool

    with pytest.raises(ValueError, match="pool_resident_mb"):
        RuntimeConfig(pool_resident_mb=-1)
    with pytest.raises(ValueError, match="pool_slots"):
        RuntimeConfig(pool_slots=0)
    assert instance_pool(RuntimeConfig(instance_pool=False)) is None
    pool = instance_pool(RuntimeConfig(pool_slots=10, memory_limit_mb=32, pool_resident_mb=8))
    assert pool is not None
    assert (pool.instances, pool.memory_bytes, pool.keep_resident_bytes) == (10, 32 << 20, 8 << 20)


def test_a_program_beyond_the_pools_limits_runs_in_its_own_memory(rt: Any) -> None:
    """Two memories: more than a pooled slot has for a core module. The program is still
    taken, and its instances run in the own-memory engine."""
    wat = '(module (memory 1) (memory 1) (func (export "run") (result i32) (i32.const 0)))'
    program = rt.add_program(wasmtime.wat2wasm(wat))
    assert program in rt.engines.unpooled
    side, store = rt.query(lambda: rt.engines.new_store(program, 1 << 20))
    assert side is rt.engines.own and rt.engines.pooled is not None
    store.close()
    assert rt.launch(program, []).wait(30).ok


def _freed(store: wasm_ffi.GuestStore) -> bool:
    try:
        store.store.ptr()
    except ValueError:  # ("already closed")
        return True
    return False


def test_stores_to_free_wait_up_to_their_cap_and_go_oldest_first() -> None:
    engine = wasm_ffi.WasmEngine()
    stores = [wasm_ffi.GuestStore(engine, memory_limit=1 << 20) for _ in range(4)]
    waiting = wasm_ffi.StoresToFree(cap=2)
    for s in stores[:3]:
        waiting.add(s)
    # The third add went past the cap: the oldest was freed at once.
    assert len(waiting) == 2 and _freed(stores[0]) and not _freed(stores[1])
    assert waiting.free_one() and len(waiting) == 1 and _freed(stores[1])
    waiting.add(stores[3])
    waiting.free_all()
    assert len(waiting) == 0 and all(_freed(s) for s in stores)
