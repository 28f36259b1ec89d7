"""``types``: the one call that suspends an inferlet (``poll``).

A pollable is the handle id of a future resource. ``poll`` takes plain ids rather than
borrowed resources: wasmtime 50.0.1 fails async host calls that borrow several resources
("deferred host scope has no call context"), and ids keep the suspending call free of
resource bookkeeping.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loom.runtime.futures import HostFuture, PollWait, Stream
from loom.runtime.host.common import iface
from loom.runtime.wasm.ffi import BOOL, U32, ComponentLinker, list_of

if TYPE_CHECKING:
    from loom.runtime.services import RuntimeServices

NAME = iface("types")
_WAITABLE = (HostFuture, Stream)


def register(linker: ComponentLinker, rt: RuntimeServices) -> None:
    def wait_on(key: int, ids: list[int]) -> PollWait:
        inst = rt.caller(key)
        get, seq = rt.handles.get, inst.seq
        if len(ids) == 1:  # the common wait: one pass's result
            futures = [get(seq, ids[0], _WAITABLE)]
        else:
            futures = [get(seq, i, _WAITABLE) for i in ids]
        pw = PollWait(futures, rt.waker(inst))
        inst.blocked = pw
        return pw

    def ready(key: int, pollable: int) -> bool:
        inst = rt.caller(key)
        return bool(rt.handles.get(inst.seq, pollable, (HostFuture, Stream)).done)

    linker.add_func(NAME, "poll", [list_of(U32)], list_of(U32), wait_on, is_async=True)
    linker.add_func(NAME, "ready", [U32], BOOL, ready)
