"""The one module that touches wasmtime's raw C API (wasmtime-py 50.0.1, pinned).

wasmtime-py's generic wrappers cost 8–24 µs per call (they re-query function types and box
every value); its ctypes bindings to the C API cost 1–3 µs. This module keeps every hot path
on those bindings and exposes a small typed surface to the rest of the runtime:

- ``WasmEngine``: one wasmtime engine (epoch interruption, small memory reservations) with
  component compile / serialize / deserialize.
- ``ComponentLinker``: host functions registered with *precompiled codecs* built from a
  type description (``U32``, ``list_of(U32)``, ``own("pollable")``...), sync or async.
  An async host function returns a ``Pending`` whose ``ready()`` is polled; while it is
  not ready the calling instance is suspended on its fiber and the thread moves on.
- ``GuestStore`` / ``CallFuture``: a store per instance (memory cap, epoch time slices
  that yield instead of trapping) and the fiber-backed async call of an export, resumed
  by ``poll()`` and cancelled by ``cancel()``.
- A minimal core-module path (``CoreLinker``) used to measure host-call cost without a
  component guest.

Nothing here knows about inferlets; ``loom.runtime.host`` builds on it.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable, Sequence
from ctypes import POINTER, byref, c_void_p
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Protocol

import wasmtime
from wasmtime import _ffi as ffi
from wasmtime.component import Component, Linker
from wasmtime.component import ResourceType as _ResourceType

from loom.runtime.wasm import trampoline as wasm_trampoline
from loom.runtime.wasm import values as wasm_values
from loom.runtime.wasm.values import Err as Err  # re-exported for the host API
from loom.runtime.wasm.values import Ok as Ok

WASMTIME_VERSION = "50.0.1"  # the private bindings below are checked against this release

_Val = ffi.wasmtime_component_val_t


class WasmError(Exception):
    """A wasmtime failure (compile, link, instantiate) or a guest trap."""


def _raise_error(err: Any, what: str) -> None:
    """Raise for a non-null ``wasmtime_error_t*`` (a typed pointer or a plain address)."""
    if err:
        if isinstance(err, int):
            err = ctypes.cast(err, POINTER(ffi.wasmtime_error_t))
        raise WasmError(f"{what}: {wasmtime.WasmtimeError._from_ptr(err)}")


def _error_text(err: Any) -> str:
    return str(wasmtime.WasmtimeError._from_ptr(err))


# ===== value types =====


@dataclass(frozen=True)
class Ty:
    """A component value type, described just far enough to build codecs."""

    kind: str  # "u8" "u16" "u32" "u64" "s32" "s64" "f32" "bool" "string" "list" ...
    args: tuple[Any, ...] = ()


U8, U16, U32, U64 = Ty("u8"), Ty("u16"), Ty("u32"), Ty("u64")
S32, S64, F32, F64, BOOL, STRING = (
    Ty("s32"),
    Ty("s64"),
    Ty("f32"),
    Ty("f64"),
    Ty("bool"),
    Ty("string"),
)


def list_of(t: Ty) -> Ty:
    return Ty("list", (t,))


def option(t: Ty) -> Ty:
    return Ty("option", (t,))


def tuple_of(*ts: Ty) -> Ty:
    return Ty("tuple", ts)


def record(*fields: tuple[str, Ty]) -> Ty:
    """A record, decoded to / encoded from a tuple of its fields in declaration order."""
    return Ty("record", fields)


def result(ok: Ty | None, err: Ty | None) -> Ty:
    """Encoded from ``Ok(value)`` / ``Err(value)``."""
    return Ty("result", (ok, err))


def enum(*names: str) -> Ty:
    """Decoded to the case index; encoded from one."""
    return Ty("enum", names)


def own(resource: str) -> Ty:
    """A resource handed to the guest; encoded from the host's integer rep."""
    return Ty("own", (resource,))


def borrow(resource: str) -> Ty:
    """A resource lent by the guest; decoded to the host's integer rep."""
    return Ty("borrow", (resource,))


class ResourceRegistry:
    """Host resource types by name: the wasmtime type object and its integer id."""

    def __init__(self) -> None:
        self.types: dict[str, _ResourceType] = {}
        self.ids: dict[str, int] = {}

    def get(self, name: str) -> _ResourceType:
        if name not in self.types:
            self.ids[name] = len(self.types) + 1
            self.types[name] = _ResourceType.host(self.ids[name])
        return self.types[name]

    def id(self, name: str) -> int:
        self.get(name)
        return self.ids[name]


# ===== engine and components =====


class WasmEngine:
    """One wasmtime engine for every inferlet of a server.

    ``memory_reservation`` shrinks the 4 GiB virtual reservation per linear memory so that
    thousands of instances fit; memories beyond it are moved when they grow.
    """

    def __init__(self, *, memory_reservation: int = 64 << 20, epoch_interruption: bool = True):
        cfg = wasmtime.Config()
        cfg.epoch_interruption = epoch_interruption
        ffi.wasmtime_config_memory_reservation_set(cfg.ptr(), memory_reservation)
        ffi.wasmtime_config_memory_guard_size_set(cfg.ptr(), 64 << 10)
        self.engine = wasmtime.Engine(cfg)

    def compile(self, wasm: bytes) -> Component:
        try:
            return Component(self.engine, wasm)
        except wasmtime.WasmtimeError as e:
            raise WasmError(f"not a valid component: {e}") from None

    def serialize(self, component: Component) -> bytes:
        return bytes(component.serialize())

    def deserialize(self, data: bytes) -> Component:
        return Component.deserialize(self.engine, data)

    def increment_epoch(self) -> None:
        self.engine.increment_epoch()


class Pending(Protocol):
    """What an async host function returns: polled until ready, then asked for results."""

    def ready(self) -> bool: ...

    def value(self) -> Any: ...


# Host callbacks find the calling instance by its store context pointer.
ContextKey = int


def context_key(ctx: Any) -> ContextKey:
    return ctypes.cast(ctx, c_void_p).value or 0


_VAL = wasm_values.VAL_SIZE


class HostCallError(Exception):
    """Raised by a host function to end the calling guest with this message."""


# The last error a host function raised, by context, so the runtime can report the
# host's own message rather than wasmtime's wrapper text.
LAST_HOST_ERROR: dict[ContextKey, str] = {}

# Parked async calls by continuation key: (pending, result encoder, context, result address).
_PENDING: dict[int, tuple[Pending, wasm_values.Encoder | None, int, int]] = {}
_CALLBACKS: list[Any] = []  # every generated callback stays alive with the process
_pending_ids = iter(range(1, 1 << 62))
_DTORS: list[Callable[[ContextKey, int], None]] = []
_ptr_at = ctypes.c_size_t.from_address
# Called around every guest resume: bound straight to the C functions on plain addresses
# (wasmtime-py's wrappers add a Python frame and pointer type checks). The poll releases
# the GIL while the guest runs, as wasmtime-py's binding does.
_set_epoch_deadline = ctypes.PYFUNCTYPE(None, c_void_p, ctypes.c_uint64)(
    ("wasmtime_context_set_epoch_deadline", ffi.dll)
)
_future_poll = ctypes.CFUNCTYPE(ctypes.c_bool, c_void_p)(("wasmtime_call_future_poll", ffi.dll))


def _fail(ctx: int, message: str) -> int:
    LAST_HOST_ERROR[ctx] = message
    return wasm_values.error_new(message.encode()) or 0


def _error_message(name: str, e: Exception) -> str:
    if isinstance(e, HostCallError):
        return str(e)
    # A host bug must not unwind through wasmtime's frames: it ends the guest instead.
    return f"host error in {name}: {type(e).__name__}: {e}"


def _sync_error(ctx: int, name: str, e: Exception) -> int:
    return _fail(ctx, _error_message(name, e))


def _async_error(ctx: int, name: str, e: Exception, err_ret: int, cont: int) -> None:
    msg = _error_message(name, e)
    LAST_HOST_ERROR[ctx] = msg
    _ptr_at(err_ret).value = wasm_values.error_new(msg.encode()) or 0
    _set_continuation(cont, _ALREADY_DONE_FN, 0, _NO_FINALIZER_FN)


class _HostCallStats:
    """Host-function calls made by guests and the time spent inside them.

    One instance with slots: every host call updates it, and a class attribute costs
    about a microsecond more per update when the caches are cold (after a guest ran)."""

    __slots__ = ("calls", "seconds")

    def __init__(self) -> None:
        self.calls, self.seconds = 0, 0.0

    def reset(self) -> None:
        self.calls, self.seconds = 0, 0.0


HostCallStats = _HostCallStats()


@ffi.wasmtime_func_async_continuation_callback_t
def _continuation(env: Any) -> bool:
    key = env or 0
    entry = _PENDING.get(key)
    if entry is None:
        return True
    t0 = perf_counter()
    pending, encoder, ctx, res = entry
    if not pending.ready():
        HostCallStats.seconds += perf_counter() - t0
        return False
    del _PENDING[key]
    if encoder is not None:
        encoder(ctx, pending.value(), res)
    HostCallStats.seconds += perf_counter() - t0
    return True


@ctypes.CFUNCTYPE(None, c_void_p)
def _continuation_finalizer(env: Any) -> None:
    # Runs when wasmtime drops the continuation (completion or cancellation).
    _PENDING.pop(env or 0, None)


def _fn_address(f: Any) -> int:
    return ctypes.cast(f, c_void_p).value or 0


@ffi.wasmtime_func_async_continuation_callback_t
def _already_done(env: Any) -> bool:
    return True


# wasmtime requires a continuation from every async callback, even one whose result
# (or trap) is already written.
_ALREADY_DONE_FN = _fn_address(_already_done)


def _set_continuation(cont: int, fn: int, env: int, finalizer: int) -> None:
    _ptr_at(cont).value = fn
    _ptr_at(cont + 8).value = env
    _ptr_at(cont + 16).value = finalizer


_CONTINUATION_FN = _fn_address(_continuation)
_CONTINUATION_FINALIZER_FN = _fn_address(_continuation_finalizer)


@ctypes.CFUNCTYPE(ctypes.c_size_t, c_void_p, c_void_p, ctypes.c_uint32)
def _dtor_trampoline(env: int, ctx: int, rep: int) -> int:
    # Every forward pass drops two resources: the context arrives as a plain address too.
    try:
        _DTORS[env or 0](ctx, rep)
        return 0
    except Exception as e:
        return _fail(ctx, f"host error dropping a resource: {e}")


@ctypes.CFUNCTYPE(None, c_void_p)
def _no_finalizer(env: Any) -> None:
    return None


_NO_FINALIZER_FN = _fn_address(_no_finalizer)
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
        if is_async:
            callback = wasm_trampoline.async_trampoline(
                full, fn, params, result, ids, _async_error, _PENDING, _pending_ids,
                (_CONTINUATION_FN, _CONTINUATION_FINALIZER_FN), HostCallStats,
            )  # fmt: skip
        else:
            callback = wasm_trampoline.sync_trampoline(
                full, fn, params, result, ids, _sync_error, HostCallStats
            )
        _CALLBACKS.append(callback)
        self._funcs.setdefault(interface, []).append((name, callback, is_async))

    def add_resource(
        self, interface: str, name: str, dtor: Callable[[ContextKey, int], None]
    ) -> None:
        if not _DTORS:
            _DTORS.append(dtor)
        _DTORS.append(dtor)
        self.resources.get(name)
        self._resources.setdefault(interface, []).append((name, len(_DTORS) - 1))

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
                            _fn_address(_dtor_trampoline), idx, _NO_FINALIZER_FN,
                        )  # fmt: skip
                        _raise_error(err, f"define resource {rname}")
                    for fname, callback, is_async in self._funcs.get(iface, []):
                        b = fname.encode()
                        add = _add_func_async if is_async else _add_func
                        err = add(ip, b, len(b), _fn_address(callback), 0, _NO_FINALIZER_FN)
                        _raise_error(err, f"define {iface}#{fname}")


class GuestStore:
    """A store for one instance: memory cap, epoch slices, and the instance once made."""

    def __init__(self, engine: WasmEngine, *, memory_limit: int, slice_ticks: int = 1) -> None:
        self.store = wasmtime.Store(engine.engine)
        self.ctx = self.store._context()
        self.key = context_key(self.ctx)
        self.store.set_limits(memory_size=memory_limit, instances=64, tables=64, memories=64)
        # At each epoch deadline the guest's fiber yields back to the runtime thread (time
        # slicing) and gets a new deadline; its return value is not an error (see pin note).
        self.store.set_epoch_deadline(slice_ticks)
        ffi.wasmtime_context_epoch_deadline_async_yield_and_update(self.ctx, slice_ticks)
        self.instance = ffi.wasmtime_component_instance_t()
        self._slice_ticks = slice_ticks

    def fresh_slice(self) -> None:
        """Give the guest a whole time slice from now (call before resuming it). A guest
        that waited, or sat in the run queue, past a tick finds its deadline gone and would
        yield at its first instruction: a wasted turn, and (measured) the decode steps of a
        batch's guests then missed the batch they were woken for."""
        _set_epoch_deadline(self.key, self._slice_ticks)

    def close(self) -> None:
        LAST_HOST_ERROR.pop(self.key, None)


class CallFuture:
    """A fiber-backed async operation (instantiation or an export call) of one store."""

    def __init__(
        self, raw: Any, keep: tuple[Any, ...], results: Any, err: Any, trap: Any = None
    ) -> None:
        self._raw = raw
        self._addr = ctypes.cast(raw, c_void_p).value
        self._keep = keep  # ctypes buffers the C side writes into until completion
        self.results = results
        self._err = err
        self._trap = trap  # core calls report traps apart from errors
        self.done = False

    def poll(self) -> bool:
        """Run the guest until it finishes (True) or suspends (False)."""
        if self.done:
            return True
        if _future_poll(self._addr):
            self.done = True
            ffi.wasmtime_call_future_delete(self._raw)
            self._raw = None
            return True
        return False

    def error(self) -> str | None:
        """The trap or error text once done, else None."""
        if self._err:
            text = _error_text(self._err)
            self._err = POINTER(ffi.wasmtime_error_t)()
            return text
        if self._trap:
            text = str(wasmtime.Trap._from_ptr(self._trap))  # takes ownership
            self._trap = None
            return text
        return None

    def cancel(self) -> None:
        """Drop the future: a suspended or running guest is abandoned."""
        if self._raw is not None:
            ffi.wasmtime_call_future_delete(self._raw)
            self._raw = None
        self.done = True


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


# ===== core modules (C/Zig inferlets on a plain C ABI; host-call measurements) =====

_CORE_VAL = ctypes.sizeof(ffi.wasmtime_val_t)  # 32: kind (u8) at 0, payload at 8
_CORE_KINDS = {"i": int(ffi.WASMTIME_I32.value), "I": int(ffi.WASMTIME_I64.value),
               "f": int(ffi.WASMTIME_F32.value)}  # fmt: skip
_CORE_CTYPES: dict[str, Any] = {"i": ctypes.c_int32, "I": ctypes.c_int64, "f": ctypes.c_float}


class CoreMemory:
    """The calling instance's exported ``memory``, bounds-checked (guest pointers are
    untrusted). Looked up per host call: a memory may move when it grows."""

    def __init__(self, caller: int) -> None:
        self._caller = caller
        self._base = 0
        self._size = -1

    def _bounds(self) -> tuple[int, int]:
        if self._size < 0:
            item = ffi.wasmtime_extern_t()
            caller = ctypes.cast(self._caller, POINTER(ffi.wasmtime_caller_t))
            if not ffi.wasmtime_caller_export_get(caller, b"memory", 6, byref(item)) or (
                item.kind != ffi.WASMTIME_EXTERN_MEMORY.value
            ):
                raise HostCallError("the inferlet exports no memory")
            ctx = ffi.wasmtime_caller_context(caller)
            mem = item.of.memory
            self._base = ctypes.cast(ffi.wasmtime_memory_data(ctx, byref(mem)), c_void_p).value or 0
            self._size = int(ffi.wasmtime_memory_data_size(ctx, byref(mem)))
        return self._base, self._size

    def _at(self, ptr: int, n: int) -> int:
        base, size = self._bounds()
        if ptr < 0 or n < 0 or ptr + n > size:
            raise HostCallError(f"memory access out of bounds: [{ptr}, {ptr + n}) of {size}")
        return base + ptr

    def read(self, ptr: int, n: int) -> bytes:
        return ctypes.string_at(self._at(ptr, n), n) if n else b""

    def write(self, ptr: int, data: bytes) -> None:
        if data:
            ctypes.memmove(self._at(ptr, len(data)), data, len(data))

    def read_u32s(self, ptr: int, n: int) -> list[int]:
        return list(struct.unpack(f"<{n}I", self.read(ptr, 4 * n)))

    def write_u32s(self, ptr: int, values: Sequence[int]) -> None:
        self.write(ptr, struct.pack(f"<{len(values)}I", *values))

    def write_f32s(self, ptr: int, values: Sequence[float]) -> None:
        self.write(ptr, struct.pack(f"<{len(values)}f", *values))


@dataclass
class _CoreFunc:
    name: str
    params: str  # one letter per parameter: i (i32), I (i64), f (f32)
    result: str  # "" or one letter
    fn: Callable[..., Any]


_CORE_FUNCS: list[_CoreFunc | None] = [None]
_CORE_PENDING: dict[int, tuple[Pending, _CoreFunc, int]] = {}


def _write_core_result(cf: _CoreFunc, results: int, value: Any) -> None:
    if cf.result:
        ctypes.c_uint8.from_address(results).value = _CORE_KINDS[cf.result]
        _CORE_CTYPES[cf.result].from_address(results + 8).value = value


@ffi.wasmtime_func_async_continuation_callback_t
def _core_continuation(env: Any) -> bool:
    key = env or 0
    entry = _CORE_PENDING.get(key)
    if entry is None:
        return True
    pending, cf, results = entry
    if not pending.ready():
        return False
    del _CORE_PENDING[key]
    _write_core_result(cf, results, pending.value())
    return True


_CORE_CONTINUATION_FN = _fn_address(_core_continuation)


_core_trap_new = ctypes.PYFUNCTYPE(c_void_p, ctypes.c_char_p, ctypes.c_size_t)(
    ("wasmtime_trap_new", ffi.dll)
)


@ctypes.CFUNCTYPE(None, c_void_p, c_void_p, c_void_p, ctypes.c_size_t, c_void_p,
                  ctypes.c_size_t, c_void_p, c_void_p)  # fmt: skip
def _core_async_trampoline(
    env: int, caller: int, args: int, nargs: int, results: int, nres: int, trap: int, cont: int
) -> None:
    cf = _CORE_FUNCS[env or 0]
    assert cf is not None
    ctx = (
        ctypes.cast(
            ffi.wasmtime_caller_context(ctypes.cast(caller, POINTER(ffi.wasmtime_caller_t))),
            c_void_p,
        ).value
        or 0
    )
    t0 = perf_counter()
    try:
        vals = [_CORE_CTYPES[p].from_address(args + i * _CORE_VAL + 8).value
                for i, p in enumerate(cf.params)]  # fmt: skip
        out = cf.fn(ctx, CoreMemory(caller), *vals)
    except Exception as e:
        msg = str(e) if isinstance(e, HostCallError) else f"host error in {cf.name}: {e}"
        LAST_HOST_ERROR[ctx] = msg
        data = msg.encode()
        _ptr_at(trap).value = _core_trap_new(data, len(data)) or 0
        _set_continuation(cont, _ALREADY_DONE_FN, 0, _NO_FINALIZER_FN)
        return
    finally:
        HostCallStats.calls += 1
        HostCallStats.seconds += perf_counter() - t0
    if hasattr(out, "ready"):  # a Pending: the guest waits on its fiber
        key = next(_pending_ids)
        _CORE_PENDING[key] = (out, cf, results)
        _set_continuation(cont, _CORE_CONTINUATION_FN, key, _CONTINUATION_FINALIZER_FN)
        return
    _write_core_result(cf, results, out)
    _set_continuation(cont, _ALREADY_DONE_FN, 0, _NO_FINALIZER_FN)


_CORE_TRAMPOLINE_FN = _fn_address(_core_async_trampoline)
_define_async_func = ctypes.PYFUNCTYPE(
    c_void_p, c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t,
    c_void_p, c_void_p, c_void_p, c_void_p,
)(("wasmtime_linker_define_async_func", ffi.dll))  # fmt: skip
_VALTYPES = {"i": wasmtime.ValType.i32, "I": wasmtime.ValType.i64, "f": wasmtime.ValType.f32}


class CoreLinker:
    """Core-module guests: host functions on a plain C ABI (numbers and memory offsets).

    Every function is defined async: it returns a value at once, or a ``Pending`` that
    suspends the calling guest on its fiber until ready."""

    def __init__(self, engine: WasmEngine) -> None:
        self.engine = engine
        self.linker = wasmtime.Linker(engine.engine)
        self._types: list[wasmtime.FuncType] = []

    def add_func(
        self, module: str, name: str, params: str, result: str, fn: Callable[..., Any]
    ) -> None:
        """``fn(context_key, memory, *args)`` for a ``(params) -> result`` import."""
        ftype = wasmtime.FuncType([_VALTYPES[p]() for p in params],
                                  [_VALTYPES[result]()] if result else [])  # fmt: skip
        self._types.append(ftype)  # the linker keeps a pointer to it
        _CORE_FUNCS.append(_CoreFunc(f"{module}.{name}", params, result, fn))
        m, n = module.encode(), name.encode()
        err = _define_async_func(
            self.linker.ptr(), m, len(m), n, len(n), ftype.ptr(), _CORE_TRAMPOLINE_FN,
            len(_CORE_FUNCS) - 1, _NO_FINALIZER_FN,
        )  # fmt: skip
        _raise_error(err, f"define {module}.{name}")

    def add_async_func(self, module: str, name: str, fn: Callable[[int], Pending | int]) -> None:
        """An ``(i32) -> i32`` import calling ``fn(arg)`` (measurements and tests)."""
        self.add_func(module, name, "i", "i", lambda ctx, mem, x: fn(x))

    def instantiate(self, store: GuestStore, module: wasmtime.Module) -> Any:
        """Instantiate (asynchronously, driven to completion here); returns the instance."""
        inst = ffi.wasmtime_instance_t()
        trap = POINTER(ffi.wasm_trap_t)()
        err = POINTER(ffi.wasmtime_error_t)()
        fut = ffi.wasmtime_linker_instantiate_async(
            self.linker.ptr(), store.ctx, module.ptr(), byref(inst), byref(trap), byref(err)
        )
        while not ffi.wasmtime_call_future_poll(fut):
            pass
        ffi.wasmtime_call_future_delete(fut)
        _raise_error(err, "instantiate")
        if trap:
            raise WasmError(str(wasmtime.Trap._from_ptr(trap)))
        return inst

    def call_async(self, store: GuestStore, instance: Any, name: str, *args: int) -> CallFuture:
        """Start calling an export taking i32 arguments and returning one i32."""
        item = ffi.wasmtime_extern_t()
        n = name.encode()
        if not ffi.wasmtime_instance_export_get(store.ctx, byref(instance), n, len(n), byref(item)):
            raise WasmError(f"the module exports no function {name!r}")
        if item.kind != ffi.WASMTIME_EXTERN_FUNC.value:
            raise WasmError(f"export {name!r} is not a function")
        argv = (ffi.wasmtime_val_t * max(1, len(args)))()
        for i, a in enumerate(args):
            argv[i].kind = ffi.WASMTIME_I32
            argv[i].of.i32 = a
        results = (ffi.wasmtime_val_t * 1)()
        trap = POINTER(ffi.wasm_trap_t)()
        err = POINTER(ffi.wasmtime_error_t)()
        raw = ffi.wasmtime_func_call_async(
            store.ctx, byref(item.of.func), argv, len(args), results, 1, byref(trap), byref(err)
        )
        return CallFuture(raw, (argv, item), results, err, trap)
