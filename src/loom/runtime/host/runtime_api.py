"""``runtime``: version, identity, arguments, models, launching children."""

from __future__ import annotations

from typing import TYPE_CHECKING

from loom.runtime.host.common import iface
from loom.runtime.services import VERSION
from loom.runtime.wasm.ffi import STRING, ComponentLinker, Err, Ok, list_of, result

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

    linker.add_func(NAME, "version", [], STRING, lambda key: VERSION)
    linker.add_func(NAME, "instance-id", [], STRING, lambda key: rt.caller(key).id)
    linker.add_func(NAME, "arguments", [], list_of(STRING), lambda key: rt.caller(key).arguments)
    linker.add_func(NAME, "models", [], list_of(STRING), lambda key: [rt.model_name])
    launched = result(STRING, STRING)
    linker.add_func(NAME, "launch", [STRING, list_of(STRING)], launched, launch)
    linker.add_func(NAME, "launch-detached", [STRING, list_of(STRING)], launched, launch_detached)
