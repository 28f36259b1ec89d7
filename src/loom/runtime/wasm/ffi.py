"""The runtime's surface on wasmtime's raw C API (wasmtime-py 50.0.1, pinned).

wasmtime-py's generic wrappers cost 8–24 µs per call (they re-query function types and box
every value); its ctypes bindings to the C API cost 1–3 µs. The modules of this package
keep every hot path on those bindings; this one gathers their small typed surface for the
rest of the runtime:

- ``types``: value type descriptions (``U32``, ``list_of(U32)``, ``own("pollable")``...).
- ``engine``: ``WasmEngine`` (epoch interruption, small memory reservations), component
  compile / serialize / deserialize, ``WasmError``.
- ``hostcalls``: the state every host call reaches (``HOST_CALLS``: the host's last error
  per instance, parked async calls, call statistics) and the C callbacks around it.
- ``component``: ``ComponentLinker``, host functions registered with precompiled codecs,
  sync or async (an async one returns a ``Pending``; while it is not ready the calling
  instance is suspended on its fiber and the thread moves on); instantiation and ``run``.
- ``store``: ``GuestStore`` (memory cap, epoch time slices that yield instead of trapping)
  and ``CallFuture``, the fiber-backed async call resumed by ``poll()``.
- ``core``: the core-module path (``CoreLinker``) of C/Zig inferlets and measurements.

Nothing here knows about inferlets; ``loom.runtime.host`` builds on it.
"""

from __future__ import annotations

from loom.runtime.wasm.component import ComponentLinker as ComponentLinker
from loom.runtime.wasm.component import call_export_async as call_export_async
from loom.runtime.wasm.component import decode_run_result as decode_run_result
from loom.runtime.wasm.component import instantiate_async as instantiate_async
from loom.runtime.wasm.core import CoreLinker as CoreLinker
from loom.runtime.wasm.core import CoreMemory as CoreMemory
from loom.runtime.wasm.engine import WASMTIME_VERSION as WASMTIME_VERSION
from loom.runtime.wasm.engine import WasmEngine as WasmEngine
from loom.runtime.wasm.engine import WasmError as WasmError
from loom.runtime.wasm.hostcalls import HOST_CALLS as HOST_CALLS
from loom.runtime.wasm.hostcalls import ContextKey as ContextKey
from loom.runtime.wasm.hostcalls import HostCallError as HostCallError
from loom.runtime.wasm.hostcalls import Pending as Pending
from loom.runtime.wasm.hostcalls import context_key as context_key
from loom.runtime.wasm.store import CallFuture as CallFuture
from loom.runtime.wasm.store import GuestStore as GuestStore
from loom.runtime.wasm.store import StoresToFree as StoresToFree
from loom.runtime.wasm.types import BOOL as BOOL
from loom.runtime.wasm.types import F32 as F32
from loom.runtime.wasm.types import F64 as F64
from loom.runtime.wasm.types import S32 as S32
from loom.runtime.wasm.types import S64 as S64
from loom.runtime.wasm.types import STRING as STRING
from loom.runtime.wasm.types import U8 as U8
from loom.runtime.wasm.types import U16 as U16
from loom.runtime.wasm.types import U32 as U32
from loom.runtime.wasm.types import U64 as U64
from loom.runtime.wasm.types import ResourceRegistry as ResourceRegistry
from loom.runtime.wasm.types import Ty as Ty
from loom.runtime.wasm.types import borrow as borrow
from loom.runtime.wasm.types import enum as enum
from loom.runtime.wasm.types import list_of as list_of
from loom.runtime.wasm.types import option as option
from loom.runtime.wasm.types import own as own
from loom.runtime.wasm.types import record as record
from loom.runtime.wasm.types import result as result
from loom.runtime.wasm.types import tuple_of as tuple_of
from loom.runtime.wasm.values import Err as Err  # re-exported for the host API
from loom.runtime.wasm.values import Ok as Ok

# The host's own message of the last error a host function raised, by context (the
# runtime reports it rather than wasmtime's wrapper text), and the host-call statistics
# the benchmarks read: the tables of ``HOST_CALLS``, never rebound.
LAST_HOST_ERROR = HOST_CALLS.last_error
HostCallStats = HOST_CALLS.stats
