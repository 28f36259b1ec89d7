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
from collections.abc import Callable, Sequence
from ctypes import POINTER, byref, c_void_p
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Protocol

import wasmtime
from wasmtime import _ffi as ffi
from wasmtime.component import Component, Linker
from wasmtime.component import ResourceType as _ResourceType

WASMTIME_VERSION = "50.0.1"  # the private bindings below are checked against this release

_Val = ffi.wasmtime_component_val_t
_VAL_SIZE = ctypes.sizeof(_Val)
_VAL_OF = _Val.of.offset  # byte offset of the union inside one value


class WasmError(Exception):
    """A wasmtime failure (compile, link, instantiate) or a guest trap."""


def _raise_error(err: Any, what: str) -> None:
    if err:
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


@dataclass(frozen=True)
class Ok:
    value: Any = None


@dataclass(frozen=True)
class Err:
    value: Any = None


_SCALARS: dict[str, tuple[str, Any]] = {
    "u8": ("u8", ffi.WASMTIME_COMPONENT_U8),
    "u16": ("u16", ffi.WASMTIME_COMPONENT_U16),
    "u32": ("u32", ffi.WASMTIME_COMPONENT_U32),
    "u64": ("u64", ffi.WASMTIME_COMPONENT_U64),
    "s32": ("s32", ffi.WASMTIME_COMPONENT_S32),
    "s64": ("s64", ffi.WASMTIME_COMPONENT_S64),
    "f32": ("f32", ffi.WASMTIME_COMPONENT_F32),
    "f64": ("f64", ffi.WASMTIME_COMPONENT_F64),
    "bool": ("boolean", ffi.WASMTIME_COMPONENT_BOOL),
}

Decoder = Callable[[Any, Any], Any]  # (context pointer, wasmtime_component_val_t) -> value
Encoder = Callable[[Any, Any, Any], None]  # (context pointer, value, val_t to fill) -> None


# wasm_byte_vec_new taking a bytes object directly (the binding wants a ubyte pointer,
# which would cost a copy into a ctypes array first).
_byte_vec_new = ctypes.CFUNCTYPE(
    None, POINTER(ffi.wasm_byte_vec_t), ctypes.c_size_t, ctypes.c_char_p
)(("wasm_byte_vec_new", ffi.dll))


def _name_vec(text: str) -> Any:
    vec = ffi.wasm_byte_vec_t()
    data = text.encode()
    _byte_vec_new(byref(vec), len(data), data)
    return vec


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


def make_decoder(t: Ty, resources: ResourceRegistry) -> Decoder:
    """Build a function reading one value of type ``t``; the val keeps its ownership."""
    k = t.kind
    if k in _SCALARS:
        field = _SCALARS[k][0]
        return lambda ctx, v: getattr(v.of, field)
    if k == "string":
        return lambda ctx, v: ctypes.string_at(v.of.string.data, v.of.string.size).decode()
    if k == "list":
        (elem,) = t.args
        if elem.kind in ("u32", "u8", "bool"):
            ctype = {"u32": ctypes.c_uint32, "u8": ctypes.c_uint8, "bool": ctypes.c_bool}[elem.kind]
            as_bytes = elem.kind == "u8"

            def dec_scalars(ctx: Any, v: Any) -> Any:
                n = v.of.list.size
                if n == 0:
                    return b"" if as_bytes else []
                base = (ctypes.cast(v.of.list.data, c_void_p).value or 0) + _VAL_OF
                # Strided read: element i's payload sits at base + i * sizeof(val).
                out = [ctype.from_address(base + i * _VAL_SIZE).value for i in range(n)]  # type: ignore[attr-defined]
                return bytes(out) if as_bytes else out

            return dec_scalars
        edec = make_decoder(elem, resources)

        def dec_list(ctx: Any, v: Any) -> Any:
            data = v.of.list.data
            return [edec(ctx, data[i]) for i in range(v.of.list.size)]

        return dec_list
    if k == "option":
        inner = make_decoder(t.args[0], resources)

        def dec_option(ctx: Any, v: Any) -> Any:
            p = v.of.option
            return inner(ctx, p.contents) if p else None

        return dec_option
    if k in ("tuple", "record"):
        decs = [make_decoder(x if k == "tuple" else x[1], resources) for x in t.args]
        if k == "tuple":
            return lambda ctx, v: tuple(d(ctx, v.of.tuple.data[i]) for i, d in enumerate(decs))
        return lambda ctx, v: tuple(d(ctx, v.of.record.data[i].val) for i, d in enumerate(decs))
    if k == "enum":
        names = {n: i for i, n in enumerate(t.args)}
        return lambda ctx, v: names[
            ctypes.string_at(v.of.enumeration.data, v.of.enumeration.size).decode()
        ]
    if k in ("borrow", "own"):

        def dec_resource(ctx: Any, v: Any) -> Any:
            host = POINTER(ffi.wasmtime_component_resource_host_t)()
            err = ffi.wasmtime_component_resource_any_to_host(ctx, v.of.resource, byref(host))
            _raise_error(err, "resource handle")
            rep = ffi.wasmtime_component_resource_host_rep(host)
            ffi.wasmtime_component_resource_host_delete(host)
            return rep

        return dec_resource
    raise ValueError(f"no decoder for {t}")


def make_encoder(t: Ty, resources: ResourceRegistry) -> Encoder:
    """Build a function writing one value of type ``t`` into a val the callee will own."""
    k = t.kind
    if k in _SCALARS:
        field, kind = _SCALARS[k]

        def enc_scalar(ctx: Any, x: Any, out: Any) -> None:
            out.kind = kind
            setattr(out.of, field, x)

        return enc_scalar
    if k == "string":

        def enc_string(ctx: Any, x: Any, out: Any) -> None:
            out.kind = ffi.WASMTIME_COMPONENT_STRING
            data = x.encode()
            _byte_vec_new(byref(out.of.string), len(data), data)

        return enc_string
    if k == "list":
        (elem,) = t.args
        eenc = make_encoder(elem, resources)

        def enc_list(ctx: Any, xs: Any, out: Any) -> None:
            n = len(xs)
            ffi.wasmtime_component_vallist_new_uninit(byref(out.of.list), n)
            out.kind = ffi.WASMTIME_COMPONENT_LIST
            data = out.of.list.data
            for i in range(n):
                eenc(ctx, xs[i], data[i])

        return enc_list
    if k == "option":
        inner = make_encoder(t.args[0], resources)

        def enc_option(ctx: Any, x: Any, out: Any) -> None:
            out.kind = ffi.WASMTIME_COMPONENT_OPTION
            if x is None:
                out.of.option = None
                return
            tmp = _Val()
            inner(ctx, x, tmp)
            out.of.option = ffi.wasmtime_component_val_new(byref(tmp))  # moves tmp's contents

        return enc_option
    if k == "tuple":
        encs = [make_encoder(x, resources) for x in t.args]

        def enc_tuple(ctx: Any, xs: Any, out: Any) -> None:
            ffi.wasmtime_component_valtuple_new_uninit(byref(out.of.tuple), len(encs))
            out.kind = ffi.WASMTIME_COMPONENT_TUPLE
            data = out.of.tuple.data
            for i, e in enumerate(encs):
                e(ctx, xs[i], data[i])

        return enc_tuple
    if k == "record":
        names = [n for n, _ in t.args]
        encs = [make_encoder(x, resources) for _, x in t.args]

        def enc_record(ctx: Any, xs: Any, out: Any) -> None:
            ffi.wasmtime_component_valrecord_new_uninit(byref(out.of.record), len(encs))
            out.kind = ffi.WASMTIME_COMPONENT_RECORD
            data = out.of.record.data
            for i, e in enumerate(encs):
                entry = data[i]
                entry.name = _name_vec(names[i])
                e(ctx, xs[i], entry.val)

        return enc_record
    if k == "result":
        ok_t, err_t = t.args
        ok_enc = make_encoder(ok_t, resources) if ok_t is not None else None
        err_enc = make_encoder(err_t, resources) if err_t is not None else None

        def enc_result(ctx: Any, x: Any, out: Any) -> None:
            out.kind = ffi.WASMTIME_COMPONENT_RESULT
            is_ok = isinstance(x, Ok)
            if not is_ok and not isinstance(x, Err):
                raise TypeError(f"result value must be Ok or Err, got {x!r}")
            out.of.result.is_ok = is_ok
            enc = ok_enc if is_ok else err_enc
            if enc is None:
                out.of.result.val = None
                return
            tmp = _Val()
            enc(ctx, x.value, tmp)
            out.of.result.val = ffi.wasmtime_component_val_new(byref(tmp))

        return enc_result
    if k == "enum":

        def enc_enum(ctx: Any, x: Any, out: Any) -> None:
            out.kind = ffi.WASMTIME_COMPONENT_ENUM
            out.of.enumeration = _name_vec(t.args[x])

        return enc_enum
    if k == "own":
        type_id = resources.id(t.args[0])

        def enc_own(ctx: Any, rep: Any, out: Any) -> None:
            host = ffi.wasmtime_component_resource_host_new(True, rep, type_id)
            anyp = POINTER(ffi.wasmtime_component_resource_any_t)()
            err = ffi.wasmtime_component_resource_host_to_any(ctx, host, byref(anyp))
            ffi.wasmtime_component_resource_host_delete(host)
            _raise_error(err, "resource handle")
            out.kind = ffi.WASMTIME_COMPONENT_RESOURCE
            out.of.resource = anyp

        return enc_own
    raise ValueError(f"no encoder for {t}")


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


@dataclass
class _HostFunc:
    name: str
    decoders: list[Decoder]
    encoder: Encoder | None
    fn: Callable[..., Any]


class HostCallError(Exception):
    """Raised by a host function to end the calling guest with this message."""


# The last error a host function raised, by context, so the runtime can report the
# host's own message rather than wasmtime's wrapper text.
LAST_HOST_ERROR: dict[ContextKey, str] = {}

_SYNC_FUNCS: list[_HostFunc] = []
_ASYNC_FUNCS: list[_HostFunc] = []
_PENDING: dict[int, tuple[Pending, _HostFunc, Any, Any]] = {}
_pending_ids = iter(range(1, 1 << 62))
_DTORS: list[Callable[[ContextKey, int], None]] = []


def _fail(ctx: Any, message: str) -> int:
    LAST_HOST_ERROR[context_key(ctx)] = message
    err = ffi.wasmtime_error_new(message.encode())
    return ctypes.cast(err, c_void_p).value or 0


class HostCallStats:
    """Host-function calls made by guests and the time spent inside them."""

    calls = 0
    seconds = 0.0

    @classmethod
    def reset(cls) -> None:
        cls.calls, cls.seconds = 0, 0.0


@ffi.wasmtime_component_func_callback_t
def _sync_trampoline(
    env: Any, ctx: Any, ty: Any, args: Any, nargs: int, res: Any, nres: int
) -> int:
    t0 = perf_counter()
    hf = _SYNC_FUNCS[env or 0]
    try:
        pyargs = [d(ctx, args[i]) for i, d in enumerate(hf.decoders)]
        out = hf.fn(context_key(ctx), *pyargs)
        if hf.encoder is not None:
            hf.encoder(ctx, out, res[0])
        return 0
    except HostCallError as e:
        return _fail(ctx, str(e))
    except Exception as e:  # a host bug must not unwind through wasmtime's frames
        return _fail(ctx, f"host error in {hf.name}: {type(e).__name__}: {e}")
    finally:
        HostCallStats.calls += 1
        HostCallStats.seconds += perf_counter() - t0


@ffi.wasmtime_func_async_continuation_callback_t
def _continuation(env: Any) -> bool:
    key = env or 0
    entry = _PENDING.get(key)
    if entry is None:
        return True
    t0 = perf_counter()
    pending, hf, ctx, res = entry
    if not pending.ready():
        HostCallStats.seconds += perf_counter() - t0
        return False
    del _PENDING[key]
    if hf.encoder is not None:
        hf.encoder(ctx, pending.value(), res[0])
    HostCallStats.seconds += perf_counter() - t0
    return True


@ctypes.CFUNCTYPE(None, c_void_p)
def _continuation_finalizer(env: Any) -> None:
    # Runs when wasmtime drops the continuation (completion or cancellation).
    _PENDING.pop(env or 0, None)


@ffi.wasmtime_component_func_async_callback_t
def _async_trampoline(
    env: Any, ctx: Any, ty: Any, args: Any, nargs: int, res: Any, nres: int, err_ret: Any, cont: Any
) -> None:
    t0 = perf_counter()
    hf = _ASYNC_FUNCS[env or 0]
    try:
        pyargs = [d(ctx, args[i]) for i, d in enumerate(hf.decoders)]
        pending = hf.fn(context_key(ctx), *pyargs)
    except Exception as e:
        msg = str(e) if isinstance(e, HostCallError) else f"host error in {hf.name}: {e}"
        LAST_HOST_ERROR[context_key(ctx)] = msg
        err_ret[0] = ffi.wasmtime_error_new(msg.encode())
        return
    key = next(_pending_ids)
    _PENDING[key] = (pending, hf, ctx, res)
    cont.contents.callback = _continuation
    cont.contents.env = key
    cont.contents.finalizer = _continuation_finalizer
    HostCallStats.calls += 1
    HostCallStats.seconds += perf_counter() - t0


@ffi.wasmtime_component_resource_destructor_t
def _dtor_trampoline(env: Any, ctx: Any, rep: int) -> int:
    try:
        _DTORS[env or 0](context_key(ctx), rep)
        return 0
    except Exception as e:
        return _fail(ctx, f"host error dropping a resource: {e}")


@ctypes.CFUNCTYPE(None, c_void_p)
def _no_finalizer(env: Any) -> None:
    return None


class ComponentLinker:
    """Host functions for component guests, grouped by interface name."""

    def __init__(self, engine: WasmEngine) -> None:
        self.engine = engine
        self.linker = Linker(engine.engine)
        self.resources = ResourceRegistry()
        self._funcs: dict[str, list[tuple[str, int, bool]]] = {}
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
        hf = _HostFunc(
            f"{interface}#{name}",
            [make_decoder(p, self.resources) for p in params],
            make_encoder(result, self.resources) if result is not None else None,
            fn,
        )
        table = _ASYNC_FUNCS if is_async else _SYNC_FUNCS
        if not table:
            table.append(hf)  # index 0 is never used: env 0 arrives as None
        table.append(hf)
        self._funcs.setdefault(interface, []).append((name, len(table) - 1, is_async))

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
                        err = ffi.wasmtime_component_linker_instance_add_resource(
                            ip, b, len(b), self.resources.get(rname).ptr(),
                            _dtor_trampoline, idx, _no_finalizer,
                        )  # fmt: skip
                        _raise_error(err, f"define resource {rname}")
                    for fname, idx, is_async in self._funcs.get(iface, []):
                        b = fname.encode()
                        if is_async:
                            err = ffi.wasmtime_component_linker_instance_add_func_async(
                                ip, b, len(b), _async_trampoline, idx, _no_finalizer
                            )
                        else:
                            err = ffi.wasmtime_component_linker_instance_add_func(
                                ip, b, len(b), _sync_trampoline, idx, _no_finalizer
                            )
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

    def close(self) -> None:
        LAST_HOST_ERROR.pop(self.key, None)


class CallFuture:
    """A fiber-backed async operation (instantiation or an export call) of one store."""

    def __init__(self, raw: Any, keep: tuple[Any, ...], results: Any, err: Any) -> None:
        self._raw = raw
        self._keep = keep  # ctypes buffers the C side writes into until completion
        self.results = results
        self._err = err
        self.done = False

    def poll(self) -> bool:
        """Run the guest until it finishes (True) or suspends (False)."""
        if self.done:
            return True
        if ffi.wasmtime_call_future_poll(self._raw):
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


# ===== core modules (host-call cost without a component guest) =====

_CORE_FUNCS: list[Callable[[int], Pending | int]] = [lambda x: 0]
_CORE_PENDING: dict[int, tuple[Pending, Any]] = {}


@ffi.wasmtime_func_async_continuation_callback_t
def _core_continuation(env: Any) -> bool:
    key = env or 0
    entry = _CORE_PENDING.get(key)
    if entry is None:
        return True
    pending, res = entry
    if not pending.ready():
        return False
    del _CORE_PENDING[key]
    res[0].kind = ffi.WASMTIME_I32
    res[0].of.i32 = int(pending.value())
    return True


@ffi.wasmtime_func_async_callback_t
def _core_async_trampoline(
    env: Any, caller: Any, args: Any, nargs: int, res: Any, nres: int, trap: Any, cont: Any
) -> None:
    out = _CORE_FUNCS[env or 0](args[0].of.i32)
    if isinstance(out, int):
        res[0].kind = ffi.WASMTIME_I32
        res[0].of.i32 = out
        return
    key = next(_pending_ids)
    _CORE_PENDING[key] = (out, res)
    cont.contents.callback = _core_continuation
    cont.contents.env = key
    cont.contents.finalizer = _continuation_finalizer


class CoreLinker:
    """Core-module guests with async ``(i32) -> i32`` host functions."""

    def __init__(self, engine: WasmEngine) -> None:
        self.engine = engine
        self.linker = wasmtime.Linker(engine.engine)
        self._functype = wasmtime.FuncType([wasmtime.ValType.i32()], [wasmtime.ValType.i32()])

    def add_async_func(self, module: str, name: str, fn: Callable[[int], Pending | int]) -> None:
        """``fn(arg)`` returns an int at once, or a ``Pending`` that suspends the guest."""
        _CORE_FUNCS.append(fn)
        m, n = module.encode(), name.encode()
        err = ffi.wasmtime_linker_define_async_func(
            self.linker.ptr(), m, len(m), n, len(n), self._functype.ptr(),
            _core_async_trampoline, len(_CORE_FUNCS) - 1, _no_finalizer,
        )  # fmt: skip
        _raise_error(err, f"define {module}.{name}")

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

    def call_async(self, store: GuestStore, instance: Any, name: str, arg: int) -> CallFuture:
        item = ffi.wasmtime_extern_t()
        n = name.encode()
        if not ffi.wasmtime_instance_export_get(store.ctx, byref(instance), n, len(n), byref(item)):
            raise WasmError(f"no export {name!r}")
        args = (ffi.wasmtime_val_t * 1)()
        args[0].kind = ffi.WASMTIME_I32
        args[0].of.i32 = arg
        results = (ffi.wasmtime_val_t * 1)()
        trap = POINTER(ffi.wasm_trap_t)()
        err = POINTER(ffi.wasmtime_error_t)()
        raw = ffi.wasmtime_func_call_async(
            store.ctx, byref(item.of.func), args, 1, results, 1, byref(trap), byref(err)
        )
        fut = CallFuture(raw, (args, item, trap), results, err)
        return fut
