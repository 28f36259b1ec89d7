"""The state every host call of a guest reaches, and the C callbacks around it.

wasmtime calls back into Python through callbacks registered once, with no way to pass
Python state but an integer ``env``: the tables those callbacks share live in one
``HostCalls`` for the process (``HOST_CALLS``), whose callbacks are closures over them (a
closure variable costs what a module global did, so the hot paths stay as they were).

- errors: a host function's exception ends the calling guest with its message, kept by
  context (``last_error``) so the runtime reports it rather than wasmtime's wrapper text;
- async calls: a host function that returns a ``Pending`` parks it under a fresh key
  (``parked``); the guest's continuation polls it, writes its value once ready, and
  wasmtime's finalizer drops it when the continuation goes (done or cancelled);
- resource destructors by index (``dtors``), every generated callback kept alive
  (``callbacks``), and the calls made and the time spent in host functions (``stats``);
- one lock (``HOST_LOCK``) that every callback holds while it runs Python: guests may
  run side by side on several threads (``runtime/turns.py``; wasmtime's poll
  releases the GIL), but the runtime's state stays single-threaded, as if every host
  call ran on the runtime thread.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Iterator
from ctypes import c_void_p
from time import perf_counter
from typing import Any, Protocol

from wasmtime import _ffi as ffi

from loom.runtime.wasm import values as wasm_values

# Held by every host callback for as long as it runs Python (re-entrant: a host function
# may drop a resource, whose destructor is a callback too). Uncontended, ~0.1 µs a call.
HOST_LOCK = threading.RLock()

# Host callbacks find the calling instance by its store context pointer.
ContextKey = int


def context_key(ctx: Any) -> ContextKey:
    return ctypes.cast(ctx, c_void_p).value or 0


class HostCallError(Exception):
    """Raised by a host function to end the calling guest with this message."""


class Pending(Protocol):
    """What an async host function returns: polled until ready, then asked for results."""

    def ready(self) -> bool: ...

    def value(self) -> Any: ...


class CallStats:
    """Host-function calls made by guests and the time spent inside them.

    One instance with slots: every host call updates it, and a class attribute costs
    about a microsecond more per update when the caches are cold (after a guest ran)."""

    __slots__ = ("calls", "seconds")

    def __init__(self) -> None:
        self.calls, self.seconds = 0, 0.0

    def reset(self) -> None:
        self.calls, self.seconds = 0, 0.0


_ptr_at = ctypes.c_size_t.from_address


def fn_address(f: Any) -> int:
    return ctypes.cast(f, c_void_p).value or 0


def set_continuation(cont: int, fn: int, env: int, finalizer: int) -> None:
    """Fill a ``wasmtime_async_continuation_t``: callback, env, finalizer (three pointers)."""
    _ptr_at(cont).value = fn
    _ptr_at(cont + 8).value = env
    _ptr_at(cont + 16).value = finalizer


@ffi.wasmtime_func_async_continuation_callback_t
def _already_done(env: Any) -> bool:
    return True


@ctypes.CFUNCTYPE(None, c_void_p)
def _no_finalizer(env: Any) -> None:
    return None


# wasmtime requires a continuation from every async callback, even one whose result
# (or trap) is already written.
ALREADY_DONE_FN = fn_address(_already_done)
NO_FINALIZER_FN = fn_address(_no_finalizer)


def error_message(name: str, e: Exception) -> str:
    if isinstance(e, HostCallError):
        return str(e)
    # A host bug must not unwind through wasmtime's frames: it ends the guest instead.
    return f"host error in {name}: {type(e).__name__}: {e}"


class HostCalls:
    """The tables the host-call callbacks share, with the callbacks that reach them.

    ``continuation_fn`` / ``finalizer_fn``: the addresses of the continuation resuming a
    parked call and of its finalizer; ``dtor_fn``: the resource destructor trampoline,
    whose ``env`` is an index into ``dtors``."""

    def __init__(self) -> None:
        # The last error a host function raised, by context.
        self.last_error: dict[ContextKey, str] = {}
        # Parked async calls by key: (pending, result encoder, context, result address).
        self.parked: dict[int, tuple[Pending, wasm_values.Encoder | None, int, int]] = {}
        self.keys: Iterator[int] = iter(range(1, 1 << 62))  # parked keys, core calls' too
        self.callbacks: list[Any] = []  # every generated callback stays alive with us
        self.dtors: list[Callable[[ContextKey, int], None]] = []
        self.stats = CallStats()
        self._c_callbacks = self._make_callbacks()
        cont, fin, dtor = self._c_callbacks
        self.continuation_fn = fn_address(cont)
        self.finalizer_fn = fn_address(fin)
        self.dtor_fn = fn_address(dtor)

    def keep(self, callback: Any) -> None:
        """Keep a callback handed to wasmtime alive with the process."""
        self.callbacks.append(callback)

    def add_dtor(self, dtor: Callable[[ContextKey, int], None]) -> int:
        """Register a resource destructor; returns its index (never 0) for ``dtor_fn``."""
        if not self.dtors:
            self.dtors.append(dtor)
        self.dtors.append(dtor)
        return len(self.dtors) - 1

    def fail(self, ctx: int, message: str) -> int:
        """Record ``message`` for the context; returns a new ``wasmtime_error_t*``."""
        self.last_error[ctx] = message
        return wasm_values.error_new(message.encode()) or 0

    def sync_error(self, ctx: int, name: str, e: Exception) -> int:
        return self.fail(ctx, error_message(name, e))

    def async_error(self, ctx: int, name: str, e: Exception, err_ret: int, cont: int) -> None:
        msg = error_message(name, e)
        self.last_error[ctx] = msg
        _ptr_at(err_ret).value = wasm_values.error_new(msg.encode()) or 0
        set_continuation(cont, ALREADY_DONE_FN, 0, NO_FINALIZER_FN)

    def _make_callbacks(self) -> tuple[Any, Any, Any]:
        parked, stats, dtors, fail = self.parked, self.stats, self.dtors, self.fail
        lock = HOST_LOCK

        @ffi.wasmtime_func_async_continuation_callback_t
        def continuation(env: Any) -> bool:
            key = env or 0
            with lock:
                entry = parked.get(key)
                if entry is None:
                    return True
                t0 = perf_counter()
                pending, encoder, ctx, res = entry
                if not pending.ready():
                    stats.seconds += perf_counter() - t0
                    return False
                del parked[key]
                if encoder is not None:
                    encoder(ctx, pending.value(), res)
                stats.seconds += perf_counter() - t0
                return True

        @ctypes.CFUNCTYPE(None, c_void_p)
        def continuation_finalizer(env: Any) -> None:
            # Runs when wasmtime drops the continuation (completion or cancellation).
            with lock:
                parked.pop(env or 0, None)

        @ctypes.CFUNCTYPE(ctypes.c_size_t, c_void_p, c_void_p, ctypes.c_uint32)
        def dtor_trampoline(env: int, ctx: int, rep: int) -> int:
            # Every forward pass drops two resources: the context arrives as a plain address too.
            with lock:
                try:
                    dtors[env or 0](ctx, rep)
                    return 0
                except Exception as e:
                    return fail(ctx, f"host error dropping a resource: {e}")

        return continuation, continuation_finalizer, dtor_trampoline


HOST_CALLS = HostCalls()
