"""A store per guest instance and the fiber-backed async operations run in it.

``GuestStore``: memory cap, epoch time slices that yield instead of trapping.
``CallFuture``: an async instantiation or export call, resumed by ``poll()`` (straight
C bindings: it runs around every guest resume) and abandoned by ``cancel()``.
``StoresToFree``: ended instances' stores, freed later, one at a time.
"""

from __future__ import annotations

import ctypes
from collections import deque
from collections.abc import Callable
from ctypes import POINTER, c_void_p
from typing import Any

import wasmtime
from wasmtime import _ffi as ffi

from loom.runtime.wasm.engine import WasmEngine, error_text
from loom.runtime.wasm.hostcalls import HOST_CALLS, context_key

# Called around every guest resume: bound straight to the C functions on plain addresses
# (wasmtime-py's wrappers add a Python frame and pointer type checks). The poll releases
# the GIL while the guest runs, as wasmtime-py's binding does.
_set_epoch_deadline = ctypes.PYFUNCTYPE(None, c_void_p, ctypes.c_uint64)(
    ("wasmtime_context_set_epoch_deadline", ffi.dll)
)
_future_poll = ctypes.CFUNCTYPE(ctypes.c_bool, c_void_p)(("wasmtime_call_future_poll", ffi.dll))


class GuestStore:
    """A store for one instance: memory cap, epoch slices, and the instance once made."""

    def __init__(
        self,
        engine: WasmEngine,
        *,
        memory_limit: int,
        slice_ticks: int = 1,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.store = wasmtime.Store(engine.engine)
        self.engine = engine
        self._on_close = on_close
        self.ctx = self.store._context()
        self.key = context_key(self.ctx)
        self.store.set_limits(memory_size=memory_limit, instances=64, tables=64, memories=64)
        # At each epoch deadline the guest's fiber yields back to the runtime thread (time
        # slicing) and gets a new deadline; its return value is not an error (see pin note).
        self.store.set_epoch_deadline(slice_ticks)
        ffi.wasmtime_context_epoch_deadline_async_yield_and_update(self.ctx, slice_ticks)
        self.instance = ffi.wasmtime_component_instance_t()
        self._slice_ticks = slice_ticks

    def fresh_slice(self, ticks: int = 0) -> None:
        """Give the guest a whole time slice (``ticks`` epoch ticks; 0: the store's own)
        from now (call before resuming it). A guest that waited, or sat in the run queue,
        past a tick finds its deadline gone and would yield at its first instruction: a
        wasted turn, and (measured) the decode steps of a batch's guests then missed the
        batch they were woken for."""
        _set_epoch_deadline(self.key, ticks or self._slice_ticks)

    def end_slice(self) -> None:
        """End the guest's time slice at its next epoch check (it yields, as at a tick)."""
        _set_epoch_deadline(self.key, 0)

    def close(self) -> None:
        """Free the store now (its memories and instances), not when the cycle collector
        finds the instance's last reference: an ended instance's memory is returned at
        once. Nothing may run in it afterwards (its call future is cancelled first)."""
        HOST_CALLS.last_error.pop(self.key, None)
        self.store.close()
        if self._on_close is not None:
            self._on_close()
            self._on_close = None


class StoresToFree:
    """Stores of ended instances, freed one at a time while the runtime thread is idle:
    freeing one (~0.3 ms; ~1 ms to reset a pooled slot) at the end would delay the turns
    and ends of the instances behind it (a cohort's last reader waited ~30 ms). At most
    ``cap`` wait: past it, ends free stores at once."""

    def __init__(self, cap: int = 64) -> None:
        self.cap = cap
        self._stores: deque[GuestStore] = deque()

    def __len__(self) -> int:
        return len(self._stores)

    def add(self, store: GuestStore) -> None:
        self._stores.append(store)
        if len(self._stores) > self.cap:
            self.free_one()

    def free_one(self) -> bool:
        """Free the oldest; whether more are left."""
        if self._stores:
            self._stores.popleft().close()
        return bool(self._stores)

    def free_pooled(self) -> bool:
        """Free the oldest store that holds a pooled slot; whether there was one."""
        for store in self._stores:
            if store.engine.pooled:
                self._stores.remove(store)
                store.close()
                return True
        return False

    def free_all(self) -> None:
        while self.free_one():
            pass


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
            text = error_text(self._err)
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
