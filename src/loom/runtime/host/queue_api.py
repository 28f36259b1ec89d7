"""``queue``: command queues, their priority and ``synchronize``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from loom.runtime.commands import CommandQueue, SyncCmd
from loom.runtime.futures import HostFuture
from loom.runtime.host.common import add_future_resource, iface
from loom.runtime.wasm.ffi import BOOL, ComponentLinker, borrow, enum, own

if TYPE_CHECKING:
    from loom.runtime.services import RuntimeServices

NAME = iface("queue")
PRIORITY = enum("low", "normal", "high")


def register(linker: ComponentLinker, rt: RuntimeServices) -> None:
    linker.add_resource(NAME, "queue", lambda key, rep: rt.handles.drop(rep))
    add_future_resource(linker, rt, NAME, "sync-result", BOOL)

    def set_priority(key: int, rep: int, p: int) -> None:
        inst = rt.caller(key)
        rt.handles.get(inst.seq, rep, CommandQueue).priority = p

    def synchronize(key: int, rep: int) -> int:
        inst = rt.caller(key)
        q = rt.handles.get(inst.seq, rep, CommandQueue)
        fut = HostFuture()
        rt.enqueue(q, SyncCmd(fut))
        return rt.handles.add(inst.seq, fut)

    linker.add_func(
        NAME, "[method]queue.set-priority", [borrow("queue"), PRIORITY], None, set_priority
    )
    linker.add_func(
        NAME, "[method]queue.synchronize", [borrow("queue")], own("sync-result"), synchronize
    )
