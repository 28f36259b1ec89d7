"""The host side of the inferlet API: one module per WIT interface.

Each module's ``register(linker, rt)`` adds its functions and resources to the component
linker. Host functions receive the caller's store key first (``rt.caller(key)`` gives the
instance), run on the runtime thread, and never wait for the engine: results the engine
must compute come back as futures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loom.runtime.host import (
    forward_api,
    generate_api,
    grammar_api,
    http_api,
    kv_api,
    log_api,
    messaging_api,
    model_api,
    queue_api,
    runtime_api,
    store_api,
    types_api,
)
from loom.runtime.wasm.ffi import ComponentLinker

if TYPE_CHECKING:
    from loom.runtime.services import RuntimeServices

PACKAGE = "loom:inferlet"
API_VERSION = "0.1.0"


def interface(name: str) -> str:
    return f"{PACKAGE}/{name}@{API_VERSION}"


def register_all(linker: ComponentLinker, rt: RuntimeServices) -> None:
    for mod in (
        types_api,
        runtime_api,
        queue_api,
        model_api,
        kv_api,
        forward_api,
        grammar_api,
        generate_api,
        messaging_api,
        store_api,
        http_api,
        log_api,
    ):
        mod.register(linker, rt)
