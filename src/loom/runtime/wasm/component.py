"""Component guests: the linker of host functions and resources, instantiation, ``run``.

A host function is registered with *precompiled codecs* built from its type description
(``wasm/trampoline.py`` generates its callback), sync or async. An async host function
returns a ``Pending`` whose ``ready()`` is polled; while it is not ready the calling
instance is suspended on its fiber and the thread moves on.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from ctypes import POINTER, byref, c_void_p
from typing import Any

from wasmtime import _ffi as ffi
from wasmtime.component import Component, Linker

from loom.runtime.wasm import trampoline as wasm_trampoline
from loom.runtime.wasm.engine import WasmEngine, WasmError, raise_error
from loom.runtime.wasm.hostcalls import HOST_CALLS, NO_FINALIZER_FN, ContextKey, fn_address
from loom.runtime.wasm.store import CallFuture, GuestStore
from loom.runtime.wasm.types import ResourceRegistry, Ty

_Val = ffi.wasmtime_component_val_t

# The linker calls take our callbacks as plain addresses (their types differ from
# wasmtime-py's prototypes only in taking ``void*`` where those take typed pointers).
_add_func = ctypes.PYFUNCTYPE(
    c_void_p, c_void_p, c_void_p, ctypes.c_size_t, c_void_p, c_void_p, c_void_p
)(("wasmtime_component_linker_instance_add_func", ffi.dll))
_add_resource = ctypes.PYFUNCTYPE(
    c_void_p, c_void_p, c_void_p, ctypes.c_size_t, c_void_p, c_void_p, c_void_p, c_void_p
)(("wasmtime_component_linker_instance_add_resource", ffi.dll))
_add_func_async = ctypes.PYFUNCTYPE(
    c_void_p, c_void_p, c_void_p, ctypes.c_size_t, c_void_p, c_void_p, c_void_p
)(("wasmtime_component_linker_instance_add_func_async", ffi.dll))


class ComponentLinker:
    """Host functions for component guests, grouped by interface name."""

    def __init__(self, engine: WasmEngine) -> None:
        self.engine = engine
        self.linker = Linker(engine.engine)
        self.resources = ResourceRegistry()
        self._funcs: dict[str, list[tuple[str, Any, bool]]] = {}
        self._resources: dict[str, list[tuple[str, int]]] = {}
        self._built = False

    def add_func(
        self,
        interface: str,
        name: str,
        params: Sequence[Ty],
        result: Ty | None,
        fn: Callable[..., Any],
        *,
        is_async: bool = False,
    ) -> None:
        """Register ``fn(context_key, *args)``; an async one returns a ``Pending``."""
        full = f"{interface}#{name}"
        ids = self.resources.id
        calls = HOST_CALLS
        if is_async:
            callback = wasm_trampoline.async_trampoline(
                full, fn, params, result, ids, calls.async_error, calls.parked, calls.keys,
                (calls.continuation_fn, calls.finalizer_fn), calls.stats,
            )  # fmt: skip
        else:
            callback = wasm_trampoline.sync_trampoline(
                full, fn, params, result, ids, calls.sync_error, calls.stats
            )
        calls.keep(callback)
        self._funcs.setdefault(interface, []).append((name, callback, is_async))

    def add_resource(
        self, interface: str, name: str, dtor: Callable[[ContextKey, int], None]
    ) -> None:
        idx = HOST_CALLS.add_dtor(dtor)
        self.resources.get(name)
        self._resources.setdefault(interface, []).append((name, idx))

    def build(self) -> None:
        """Write everything registered into the wasmtime linker (once)."""
        if self._built:
            return
        self._built = True
        with self.linker.root() as root:
            for iface in sorted(set(self._funcs) | set(self._resources)):
                with root.add_instance(iface) as inst:
                    ip = inst.ptr()
                    for rname, idx in self._resources.get(iface, []):
                        b = rname.encode()
                        err = _add_resource(
                            ip, b, len(b), self.resources.get(rname).ptr(),
                            HOST_CALLS.dtor_fn, idx, NO_FINALIZER_FN,
                        )  # fmt: skip
                        raise_error(err, f"define resource {rname}")
                    for fname, callback, is_async in self._funcs.get(iface, []):
                        b = fname.encode()
                        add = _add_func_async if is_async else _add_func
                        err = add(ip, b, len(b), fn_address(callback), 0, NO_FINALIZER_FN)
                        raise_error(err, f"define {iface}#{fname}")


def instantiate_async(
    linker: ComponentLinker, store: GuestStore, component: Component
) -> CallFuture:
    linker.build()
    err = POINTER(ffi.wasmtime_error_t)()
    raw = ffi.wasmtime_component_linker_instantiate_async(
        linker.linker.ptr(), store.ctx, component.ptr(), byref(store.instance), byref(err)
    )
    return CallFuture(raw, (component,), None, err)


def call_export_async(store: GuestStore, component: Component, name: str) -> CallFuture:
    """Start calling a nullary export that returns one value (``run``)."""
    index = ffi.wasmtime_component_instance_get_export_index(
        byref(store.instance), store.ctx, None, name.encode(), len(name.encode())
    )
    if not index:
        raise WasmError(f"the component exports no function {name!r}")
    func = ffi.wasmtime_component_func_t()
    found = ffi.wasmtime_component_instance_get_func(
        byref(store.instance), store.ctx, index, byref(func)
    )
    ffi.wasmtime_component_export_index_delete(index)
    if not found:
        raise WasmError(f"export {name!r} is not a function")
    results = (_Val * 1)()
    err = POINTER(ffi.wasmtime_error_t)()
    raw = ffi.wasmtime_component_func_call_async(
        byref(func), store.ctx, None, 0, results, 1, byref(err)
    )
    return CallFuture(raw, (func, component), results, err)


def decode_run_result(results: Any) -> str | None:
    """``run``'s ``result<_, string>``: None on ok, else the error string."""
    v = results[0]
    if v.of.result.is_ok:
        return None
    p = v.of.result.val
    if not p:
        return "inferlet returned an error"
    inner = p.contents
    return ctypes.string_at(inner.of.string.data, inner.of.string.size).decode()
