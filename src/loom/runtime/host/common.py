"""Helpers shared by the host API modules: interface names, future resources, samplers."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from loom.engine.batch import SamplerSpec
from loom.runtime.futures import HostFuture, Stream
from loom.runtime.wasm.ffi import U32, ComponentLinker, HostCallError, Ty, borrow, option

if TYPE_CHECKING:
    from loom.runtime.services import RuntimeServices


def iface(name: str) -> str:
    return f"loom:inferlet/{name}@0.1.0"


def add_future_resource(
    linker: ComponentLinker,
    rt: RuntimeServices,
    interface: str,
    resource: str,
    value_ty: Ty,
    get: Callable[[Any], Any] | None = None,
) -> None:
    """A result resource backed by a ``HostFuture``: ``pollable()`` and ``get()``."""
    linker.add_resource(interface, resource, lambda key, rep: rt.handles.drop(rep))

    def pollable(key: int, rep: int) -> int:
        # The pollable id is the future's own handle: valid exactly while the future lives.
        rt.handles.get(rt.caller(key).seq, rep, (HostFuture, Stream))
        return rep

    def get_value(key: int, rep: int) -> Any:
        inst = rt.caller(key)
        fut = rt.handles.get(inst.seq, rep, (HostFuture, Stream))
        if get is not None:
            return get(fut)
        return fut.value if fut.done else None

    linker.add_func(interface, f"[method]{resource}.pollable", [borrow(resource)], U32, pollable)
    linker.add_func(
        interface, f"[method]{resource}.get", [borrow(resource)], option(value_ty), get_value
    )


def sampler_spec(s: tuple[float, int, float, float, int | None]) -> SamplerSpec:
    """The engine's sampler for a WIT ``sampler`` record, validated once per distinct value
    (inferlets pass the same few samplers on every call)."""
    spec = _SAMPLERS.get(s)
    if spec is None:
        spec = _new_sampler_spec(s)
        if len(_SAMPLERS) >= 4096:
            _SAMPLERS.clear()
        _SAMPLERS[s] = spec
    return spec


_SAMPLERS: dict[tuple[float, int, float, float, int | None], SamplerSpec] = {}


def _new_sampler_spec(s: tuple[float, int, float, float, int | None]) -> SamplerSpec:
    temperature, top_k, top_p, min_p, seed = s
    spec = SamplerSpec(float(temperature), int(top_k), float(top_p), float(min_p), seed)
    try:
        spec.validate()
    except ValueError as e:
        raise HostCallError(f"bad sampler: {e}") from None
    return spec
