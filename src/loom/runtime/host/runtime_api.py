"""``runtime``: version, identity, arguments, models, launching, waiting for and ending
children."""

from __future__ import annotations

from typing import TYPE_CHECKING

from loom.runtime.host.common import add_future_resource, iface
from loom.runtime.services import VERSION
from loom.runtime.wasm.ffi import STRING, ComponentLinker, Err, Ok, list_of, own, result

if TYPE_CHECKING:
    from loom.runtime.services import RuntimeServices

NAME = iface("runtime")


def register(linker: ComponentLinker, rt: RuntimeServices) -> None:
    def launch(key: int, program: str, args: list[str], detached: bool = False) -> Ok | Err:
        parent = rt.caller(key)
        if program not in rt.programs:
            return Err(f"no program with hash {program}")
        child = rt.launch_child(parent, program, args, detached=detached)
        return Err(child) if isinstance(child, str) else Ok(child.id)

    def launch_detached(key: int, program: str, args: list[str]) -> Ok | Err:
        return launch(key, program, args, detached=True)

    def wait_child(key: int, child_id: str) -> Ok | Err:
        parent = rt.caller(key)
        ended = parent.child_ends.get(child_id)
        if ended is None:
            return Err(f"{child_id!r} is not a child of this instance")
        return Ok(rt.handles.add(parent.seq, ended))

    def kill_child(key: int, child_id: str) -> Ok | Err:
        parent = rt.caller(key)
        if child_id not in parent.child_ends:
            return Err(f"{child_id!r} is not a child of this instance")
        child = rt.instances.get(child_id)
        if child is not None:
            rt.kill(child, f"ended by its parent {parent.id}")
        return Ok(None)

    add_future_resource(linker, rt, NAME, "child-end", result(None, STRING))
    linker.add_func(NAME, "wait-child", [STRING], result(own("child-end"), STRING), wait_child)
    linker.add_func(NAME, "kill-child", [STRING], result(None, STRING), kill_child)
    linker.add_func(NAME, "version", [], STRING, lambda key: VERSION)
    linker.add_func(NAME, "instance-id", [], STRING, lambda key: rt.caller(key).id)
    linker.add_func(NAME, "arguments", [], list_of(STRING), lambda key: rt.caller(key).arguments)
    linker.add_func(NAME, "models", [], list_of(STRING), lambda key: [rt.model_name])
    launched = result(STRING, STRING)
    linker.add_func(NAME, "launch", [STRING, list_of(STRING)], launched, launch)
    linker.add_func(NAME, "launch-detached", [STRING, list_of(STRING)], launched, launch_detached)
