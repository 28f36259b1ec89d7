"""``kv``: virtual KV pages — allocate, free, copy, mask, export/import by reference."""

from __future__ import annotations

from typing import TYPE_CHECKING

from loom.runtime.commands import (
    AllocateCmd,
    CommandQueue,
    CopyCmd,
    ExportCmd,
    FreeCmd,
    MaskCmd,
    PublishCmd,
    UnexportCmd,
)
from loom.runtime.host.common import iface
from loom.runtime.wasm.ffi import (
    BOOL,
    STRING,
    U32,
    ComponentLinker,
    Err,
    HostCallError,
    Ok,
    borrow,
    list_of,
    result,
    tuple_of,
)

if TYPE_CHECKING:
    from loom.runtime.instance import Instance
    from loom.runtime.services import RuntimeServices

NAME = iface("kv")
MAX_PAGES_PER_CALL = 1 << 16


def register(linker: ComponentLinker, rt: RuntimeServices) -> None:
    def queue_of(key: int, rep: int) -> tuple[Instance, CommandQueue]:
        inst = rt.caller(key)
        return inst, rt.handles.get(inst.seq, rep, CommandQueue)

    def allocate(key: int, q: int, n: int) -> list[int]:
        inst, queue = queue_of(key, q)
        if not 0 < n <= MAX_PAGES_PER_CALL:
            raise HostCallError(f"allocate: n must be in [1, {MAX_PAGES_PER_CALL}], got {n}")
        ids = inst.pages.reserve(n)
        rt.enqueue(queue, AllocateCmd(ids))
        return ids

    def free(key: int, q: int, pages: list[int]) -> None:
        inst, queue = queue_of(key, q)
        inst.pages.check(pages)
        rt.enqueue(queue, FreeCmd(pages))

    def copy(key: int, q: int, src: int, dst: int, so: int, do: int, size: int) -> None:
        inst, queue = queue_of(key, q)
        inst.pages.check([src, dst])
        ps = rt.page_size
        if not (so + size <= ps and do + size <= ps):
            raise HostCallError(f"copy: slot range out of page bounds (page size {ps})")
        rt.enqueue(queue, CopyCmd(src, dst, so, do, size))

    def mask(key: int, q: int, page: int, keep: list[bool]) -> None:
        inst, queue = queue_of(key, q)
        inst.pages.check([page])
        if len(keep) != rt.page_size:
            raise HostCallError(f"mask: {len(keep)} flags for a page of {rt.page_size} slots")
        rt.enqueue(queue, MaskCmd(page, keep))

    def export_pages(key: int, q: int, pages: list[int], name: str, persistent: bool) -> None:
        inst, queue = queue_of(key, q)
        inst.pages.check(pages)
        if not name:
            raise HostCallError("export: the name is empty")
        rt.enqueue(queue, ExportCmd(pages, name, persistent))

    def import_pages(key: int, q: int, name: str) -> Ok | Err:
        inst, _ = queue_of(key, q)
        physical = rt.exports.take(name, inst.program)
        if physical is None:
            return Err(f"no KV pages are exported under the name {name!r} (or they are "
                       f"another program's, not published)")  # fmt: skip
        return Ok(inst.pages.adopt(physical))

    def unexport(key: int, q: int, name: str) -> None:
        _, queue = queue_of(key, q)
        rt.enqueue(queue, UnexportCmd(name))

    def publish(key: int, q: int, name: str) -> None:
        _, queue = queue_of(key, q)
        rt.enqueue(queue, PublishCmd(name))

    def listing(key: int) -> list[tuple[str, int]]:
        return rt.exports.listing(rt.caller(key).program)

    qt = borrow("queue")
    pages_t = list_of(U32)
    linker.add_func(NAME, "page-size", [qt], U32, lambda key, q: rt.page_size)
    linker.add_func(NAME, "allocate", [qt, U32], pages_t, allocate)
    linker.add_func(NAME, "free", [qt, pages_t], None, free)
    linker.add_func(NAME, "copy", [qt, U32, U32, U32, U32, U32], None, copy)
    linker.add_func(NAME, "mask", [qt, U32, list_of(BOOL)], None, mask)
    linker.add_func(NAME, "export-pages", [qt, pages_t, STRING, BOOL], None, export_pages)
    linker.add_func(NAME, "import-pages", [qt, STRING], result(pages_t, STRING), import_pages)
    linker.add_func(NAME, "list-exports", [], list_of(tuple_of(STRING, U32)), listing)
    linker.add_func(NAME, "unexport-pages", [qt, STRING], None, unexport)
    linker.add_func(NAME, "publish-export", [qt, STRING], None, publish)
