"""``store``: one persistent in-memory key-value store shared by all inferlets, each
program's keys and values held to ``--store-quota-mb``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from loom.runtime.host.common import iface
from loom.runtime.wasm.ffi import BOOL, STRING, ComponentLinker, HostCallError, list_of, option

if TYPE_CHECKING:
    from loom.runtime.services import RuntimeServices

NAME = iface("store")


def register(linker: ComponentLinker, rt: RuntimeServices) -> None:
    store = rt.messaging.store_kv

    def set_value(key: int, k: str, v: str) -> None:
        inst = rt.caller(key)
        if len(k.encode()) + len(v.encode()) > rt.config.max_message_bytes:
            raise HostCallError("store: key plus value exceed the message-size cap")
        store.set(inst.program, k, v, rt.config.store_quota_mb << 20)

    def delete(key: int, k: str) -> None:
        rt.caller(key)
        store.pop(k, None)

    linker.add_func(NAME, "get", [STRING], option(STRING), lambda key, k: store.get(k))
    linker.add_func(NAME, "set", [STRING, STRING], None, set_value)
    linker.add_func(NAME, "delete", [STRING], None, delete)
    linker.add_func(NAME, "exists", [STRING], BOOL, lambda key, k: k in store)
    linker.add_func(NAME, "list-keys", [], list_of(STRING), lambda key: sorted(store))
