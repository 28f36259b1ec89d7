"""Component value types, described just far enough to build codecs, and host resources.

A host function is registered with its parameter and result types (``U32``,
``list_of(U32)``, ``own("pollable")``...): ``decode``, ``encode`` and ``trampoline`` build
their code once from these descriptions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from wasmtime.component import ResourceType as _ResourceType


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
