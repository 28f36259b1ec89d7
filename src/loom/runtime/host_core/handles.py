"""What the ``loom`` imports share: the module name, limits, and the instance's handles.

Handles (models, queues, futures) are small integers owned by the instance in
``rt.handles``; ``loom_drop`` releases a model or a future.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loom.engine.batch import OutputSpec
from loom.runtime.commands import CommandQueue
from loom.runtime.futures import HostFuture
from loom.runtime.wasm.ffi import CoreLinker, CoreMemory

if TYPE_CHECKING:
    from loom.runtime.services import RuntimeServices

MODULE = "loom"
MAX_TOKENS_PER_CALL = 1 << 16


class Model:
    """The model handle a native inferlet holds."""


class PassResult:
    """A finished forward pass's outputs, kept for ``loom_dist``."""

    def __init__(self, fut: HostFuture, specs: list[OutputSpec]) -> None:
        self.fut = fut
        self.specs = specs


def queue_of(rt: RuntimeServices, key: int, q: int) -> tuple[Any, CommandQueue]:
    """The calling instance and its queue ``q``."""
    inst = rt.caller(key)
    return inst, rt.handles.get(inst.seq, q, CommandQueue)


def check_model(rt: RuntimeServices, key: int, m: int) -> Any:
    """The calling instance, once ``m`` is its model handle."""
    inst = rt.caller(key)
    rt.handles.get(inst.seq, m, Model)
    return inst


def register(linker: CoreLinker, rt: RuntimeServices) -> None:
    def drop(key: int, mem: CoreMemory, h: int) -> None:
        inst = rt.caller(key)
        rt.handles.get(inst.seq, h, (PassResult, Model))
        rt.handles.drop(h)

    linker.add_func(MODULE, "drop", "i", "", drop)
