"""``loom`` arguments and messages: ``arg_count``, ``arg``, ``send``, ``fail``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from loom.runtime.host_core.handles import MODULE
from loom.runtime.messaging import pause_if_backlogged
from loom.runtime.wasm.ffi import CoreLinker, CoreMemory, HostCallError

if TYPE_CHECKING:
    from loom.runtime.services import RuntimeServices


def register(linker: CoreLinker, rt: RuntimeServices) -> None:
    def arg_count(key: int, mem: CoreMemory) -> int:
        return len(rt.caller(key).arguments)

    def arg(key: int, mem: CoreMemory, i: int, buf: int, cap: int) -> int:
        args = rt.caller(key).arguments
        if not 0 <= i < len(args):
            raise HostCallError(f"loom_arg: no argument {i} (there are {len(args)})")
        data = args[i].encode()
        mem.write(buf, data[: max(0, cap)])
        return len(data)

    def send(key: int, mem: CoreMemory, ptr: int, n: int) -> None:
        text = mem.read(ptr, n).decode("utf-8", errors="replace")
        inst = rt.caller(key)
        rt.messaging.send_to_client(inst, text)
        pause_if_backlogged(inst, rt.call_soon, rt.waker)

    def fail(key: int, mem: CoreMemory, ptr: int, n: int) -> None:
        rt.caller(key).native_error = mem.read(ptr, n).decode("utf-8", errors="replace")

    linker.add_func(MODULE, "arg_count", "", "i", arg_count)
    linker.add_func(MODULE, "arg", "iii", "i", arg)
    linker.add_func(MODULE, "send", "ii", "", send)
    linker.add_func(MODULE, "fail", "ii", "", fail)
