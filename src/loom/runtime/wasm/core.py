"""Core-module guests: C/Zig inferlets on a plain C ABI, and host-call measurements.

Host functions take and return numbers (``i32``, ``i64``, ``f32``) and memory offsets,
read through ``CoreMemory``. Every one is defined async on one shared trampoline, whose
``env`` indexes the functions of ``CoreCalls``: it returns a value at once, or a
``Pending`` that suspends the calling guest on its fiber until ready.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable, Sequence
from ctypes import POINTER, byref, c_void_p
from dataclasses import dataclass
from time import perf_counter
from typing import Any

import wasmtime
from wasmtime import _ffi as ffi

from loom.runtime.wasm.engine import WasmEngine, WasmError, raise_error
from loom.runtime.wasm.hostcalls import (
    ALREADY_DONE_FN,
    HOST_CALLS,
    HOST_LOCK,
    NO_FINALIZER_FN,
    HostCallError,
    HostCalls,
    Pending,
    fn_address,
    set_continuation,
)
from loom.runtime.wasm.store import CallFuture, GuestStore

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


def _write_core_result(cf: _CoreFunc, results: int, value: Any) -> None:
    if cf.result:
        ctypes.c_uint8.from_address(results).value = _CORE_KINDS[cf.result]
        _CORE_CTYPES[cf.result].from_address(results + 8).value = value


_ptr_at = ctypes.c_size_t.from_address
_core_trap_new = ctypes.PYFUNCTYPE(c_void_p, ctypes.c_char_p, ctypes.c_size_t)(
    ("wasmtime_trap_new", ffi.dll)
)
_ASYNC_FUNC = ctypes.CFUNCTYPE(None, c_void_p, c_void_p, c_void_p, ctypes.c_size_t, c_void_p,
                               ctypes.c_size_t, c_void_p, c_void_p)  # fmt: skip


class CoreCalls:
    """The core host functions by index (the trampoline's ``env``, 0 unused), their
    parked calls, and the trampoline and continuation reaching them. Errors, call keys
    and statistics are shared with the component host calls (``calls``)."""

    def __init__(self, calls: HostCalls) -> None:
        self.funcs: list[_CoreFunc | None] = [None]
        self.parked: dict[int, tuple[Pending, _CoreFunc, int]] = {}
        self._c_callbacks = self._make_callbacks(calls)
        self.trampoline_fn = fn_address(self._c_callbacks[1])

    def add(self, func: _CoreFunc) -> int:
        """Register a function; returns its index (the ``env`` of its definition)."""
        self.funcs.append(func)
        return len(self.funcs) - 1

    def _make_callbacks(self, calls: HostCalls) -> tuple[Any, Any]:
        funcs, parked = self.funcs, self.parked
        last_error, stats, keys = calls.last_error, calls.stats, calls.keys
        # (A cancelled guest's parked core call is dropped with the component's finalizer.)
        finalizer_fn = calls.finalizer_fn

        @ffi.wasmtime_func_async_continuation_callback_t
        def continuation(env: Any) -> bool:
            key = env or 0
            with HOST_LOCK:
                entry = parked.get(key)
                if entry is None:
                    return True
                pending, cf, results = entry
                if not pending.ready():
                    return False
                del parked[key]
                _write_core_result(cf, results, pending.value())
                return True

        continuation_fn = fn_address(continuation)

        @_ASYNC_FUNC
        def trampoline(
            env: int, caller: int, args: int, nargs: int, results: int, nres: int, trap: int,
            cont: int,
        ) -> None:  # fmt: skip
            with HOST_LOCK:
                call(env, caller, args, results, trap, cont)

        def call(env: int, caller: int, args: int, results: int, trap: int, cont: int) -> None:
            cf = funcs[env or 0]
            assert cf is not None
            ctx = (
                ctypes.cast(
                    ffi.wasmtime_caller_context(
                        ctypes.cast(caller, POINTER(ffi.wasmtime_caller_t))
                    ),
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
                last_error[ctx] = msg
                data = msg.encode()
                _ptr_at(trap).value = _core_trap_new(data, len(data)) or 0
                set_continuation(cont, ALREADY_DONE_FN, 0, NO_FINALIZER_FN)
                return
            finally:
                stats.calls += 1
                stats.seconds += perf_counter() - t0
            if hasattr(out, "ready"):  # a Pending: the guest waits on its fiber
                key = next(keys)
                parked[key] = (out, cf, results)
                set_continuation(cont, continuation_fn, key, finalizer_fn)
                return
            _write_core_result(cf, results, out)
            set_continuation(cont, ALREADY_DONE_FN, 0, NO_FINALIZER_FN)

        return continuation, trampoline


_CORE_CALLS = CoreCalls(HOST_CALLS)
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
        index = _CORE_CALLS.add(_CoreFunc(f"{module}.{name}", params, result, fn))
        m, n = module.encode(), name.encode()
        err = _define_async_func(
            self.linker.ptr(), m, len(m), n, len(n), ftype.ptr(), _CORE_CALLS.trampoline_fn,
            index, NO_FINALIZER_FN,
        )  # fmt: skip
        raise_error(err, f"define {module}.{name}")

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
        raise_error(err, "instantiate")
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
