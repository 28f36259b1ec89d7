"""``loom`` queues and KV pages: ``queue``, ``page_size``, ``allocate``, ``free`` (page
ids are valid at once; memory is bound in queue order)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from loom.runtime.commands import AllocateCmd, FreeCmd
from loom.runtime.host_core.handles import MAX_TOKENS_PER_CALL, MODULE, check_model, queue_of
from loom.runtime.wasm.ffi import CoreLinker, CoreMemory, HostCallError

if TYPE_CHECKING:
    from loom.runtime.services import RuntimeServices


def register(linker: CoreLinker, rt: RuntimeServices) -> None:
    def queue(key: int, mem: CoreMemory, m: int) -> int:
        inst = check_model(rt, key, m)
        return rt.handles.add(inst.seq, rt.new_queue(inst))

    def page_size(key: int, mem: CoreMemory, q: int) -> int:
        queue_of(rt, key, q)
        return rt.page_size

    def allocate(key: int, mem: CoreMemory, q: int, n: int, out: int) -> int:
        inst, queue = queue_of(rt, key, q)
        if not 0 < n <= MAX_TOKENS_PER_CALL:
            raise HostCallError(f"loom_allocate: n must be in [1, {MAX_TOKENS_PER_CALL}]")
        mem.write(out, bytes(4 * n))  # bounds first: nothing is reserved for a bad buffer
        ids = inst.pages.reserve(n)
        rt.enqueue(queue, AllocateCmd(ids))
        mem.write_u32s(out, ids)
        return n

    def free(key: int, mem: CoreMemory, q: int, pages: int, n: int) -> None:
        inst, queue = queue_of(rt, key, q)
        ids = mem.read_u32s(pages, n)
        inst.pages.check(ids)
        rt.enqueue(queue, FreeCmd(ids))

    linker.add_func(MODULE, "queue", "i", "i", queue)
    linker.add_func(MODULE, "page_size", "i", "i", page_size)
    linker.add_func(MODULE, "allocate", "iii", "i", allocate)
    linker.add_func(MODULE, "free", "iii", "", free)
