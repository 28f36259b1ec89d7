"""The C ABI for native (C/Zig) inferlets: import module ``loom``, numbers and offsets.

Native inferlets are plain core modules (no component toolchain installs here): they
export ``memory`` and ``int32_t run(void)`` (0: success) and import the functions below.
Buffers are (offset, length) pairs in the guest's memory, checked against its bounds.
Handles (models, queues, futures) are small integers owned by the instance. The
declarations are in ``loom/sdk/c/loom.h``, one module here per section of it; the
semantics follow the WIT API.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loom.runtime.host_core import args_api, forward_api, handles, kv_api, model_api
from loom.runtime.wasm.ffi import CoreLinker

if TYPE_CHECKING:
    from loom.runtime.services import RuntimeServices


def register_core(linker: CoreLinker, rt: RuntimeServices) -> None:
    """Add every ``loom`` import to the core linker."""
    args_api.register(linker, rt)  # arguments and messages
    model_api.register(linker, rt)  # the model and its tokenizer
    kv_api.register(linker, rt)  # queues and KV pages
    forward_api.register(linker, rt)  # forward passes, waits, pipelined decode steps
    handles.register(linker, rt)  # loom_drop
