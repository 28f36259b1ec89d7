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
    def launch(key: int, program: str, args: list[str]) -> Ok | Err:
        rt.caller(key)
        if program not in rt.programs:
            return Err(f"no program with hash {program}")
        return Ok(rt.launch(program, args).id)

    linker.add_func(NAME, "version", [], STRING, lambda key: VERSION)
    linker.add_func(NAME, "instance-id", [], STRING, lambda key: rt.caller(key).id)
    linker.add_func(NAME, "arguments", [], list_of(STRING), lambda key: rt.caller(key).arguments)
    linker.add_func(NAME, "models", [], list_of(STRING), lambda key: [rt.model_name])
    linker.add_func(NAME, "launch", [STRING, list_of(STRING)], result(STRING, STRING), launch)
