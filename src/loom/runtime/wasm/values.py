"""Component values as wasmtime's C API lays them out: sizes, offsets, kinds, the C
helpers the codecs call, and the Python side of ``result`` (``Ok`` / ``Err``).

Part of the wasmtime C-API layer with ``ffi`` (which owns engines, linkers, stores and
calls), ``decode`` (guest values to Python) and ``encode`` (Python values to guest
values). A host call's arguments arrive as an array of ``wasmtime_component_val_t`` and
its result is written into one, so every guest call pays for these conversions.
Building ctypes structure objects for every field cost 30–80 µs per forward pass; here
a value is an integer address and fields are read with one ``from_address`` or one
``string_at`` + ``memoryview`` slice, and the C helpers are called through
``PYFUNCTYPE`` prototypes on plain ``void*`` (no argument checking, no GIL release: they
never block and never call back).

Layout (wasmtime 50.0.1, 64-bit): a value is 32 bytes, ``kind`` (u8) at 0 and the payload
at 8. Lists, tuples, strings and enum names are ``(size_t size, T* data)`` at 8; a record
entry is 48 bytes, its name vec at 0 and its value at 16; an option holds a ``val*`` at 8;
a result holds ``bool is_ok`` at 8 and a ``val*`` at 16; a resource holds a
``resource_any*`` at 8. ``tests/runtime/test_wasm_codec.py`` checks these offsets against
wasmtime-py's own structure definitions.
"""

from __future__ import annotations

import ctypes
import struct
from array import array
from collections.abc import Callable
from ctypes import c_bool, c_size_t, c_uint8, c_uint32, c_void_p
from dataclasses import dataclass
from typing import Any

from wasmtime import _ffi as ffi

VAL_SIZE = 32  # sizeof(wasmtime_component_val_t)
PAYLOAD = 8  # offset of the union inside a value
ENTRY_SIZE = 48  # sizeof(wasmtime_component_valrecord_entry_t)
ENTRY_VAL = 16  # offset of the value inside a record entry

_P = ctypes.PYFUNCTYPE
_V = c_void_p
any_to_host = _P(_V, _V, _V, _V)(("wasmtime_component_resource_any_to_host", ffi.dll))
host_rep = _P(c_uint32, _V)(("wasmtime_component_resource_host_rep", ffi.dll))
host_delete = _P(None, _V)(("wasmtime_component_resource_host_delete", ffi.dll))
host_new = _P(_V, c_bool, c_uint32, c_uint32)(("wasmtime_component_resource_host_new", ffi.dll))
host_type = _P(c_uint32, _V)(("wasmtime_component_resource_host_type", ffi.dll))
host_owned = _P(c_bool, _V)(("wasmtime_component_resource_host_owned", ffi.dll))
host_to_any = _P(_V, _V, _V, _V)(("wasmtime_component_resource_host_to_any", ffi.dll))
vallist_new = _P(None, _V, c_size_t)(("wasmtime_component_vallist_new_uninit", ffi.dll))
valrecord_new = _P(None, _V, c_size_t)(("wasmtime_component_valrecord_new_uninit", ffi.dll))
valtuple_new = _P(None, _V, c_size_t)(("wasmtime_component_valtuple_new_uninit", ffi.dll))
val_new = _P(_V, _V)(("wasmtime_component_val_new", ffi.dll))
val_clone = _P(None, _V, _V)(("wasmtime_component_val_clone", ffi.dll))
val_delete = _P(None, _V)(("wasmtime_component_val_delete", ffi.dll))
byte_vec_new = _P(None, _V, c_size_t, ctypes.c_char_p)(("wasm_byte_vec_new", ffi.dll))
error_new = _P(_V, ctypes.c_char_p)(("wasmtime_error_new", ffi.dll))

u8_at = c_uint8.from_address
u32_at = c_uint32.from_address
ptr_at = c_size_t.from_address
_PAIR = struct.Struct("<QQ")  # (size, data) of a list, string or name
KIND_PTR = struct.Struct("<B7xQ")  # a value's kind and a pointer payload


def _kind(name: str) -> int:
    return int(getattr(ffi, f"WASMTIME_COMPONENT_{name}").value)


# scalar kind name -> (component kind, struct format of the payload, array typecode)
SCALARS: dict[str, tuple[int, str, str]] = {
    "bool": (_kind("BOOL"), "?", "B"),
    "u8": (_kind("U8"), "B", "B"),
    "u16": (_kind("U16"), "H", "H"),
    "u32": (_kind("U32"), "I", "I"),
    "u64": (_kind("U64"), "Q", "Q"),
    "s32": (_kind("S32"), "i", "i"),
    "s64": (_kind("S64"), "q", "q"),
    "f32": (_kind("F32"), "f", "f"),
    "f64": (_kind("F64"), "d", "d"),
}
CTYPES: dict[str, Any] = {
    "bool": c_bool,
    "u8": c_uint8,
    "u16": ctypes.c_uint16,
    "u32": c_uint32,
    "u64": ctypes.c_uint64,
    "s32": ctypes.c_int32,
    "s64": ctypes.c_int64,
    "f32": ctypes.c_float,
    "f64": ctypes.c_double,
}
K_STRING, K_LIST, K_RECORD, K_TUPLE = (_kind(n) for n in ("STRING", "LIST", "RECORD", "TUPLE"))
K_OPTION, K_RESULT = _kind("OPTION"), _kind("RESULT")
K_ENUM, K_RESOURCE = _kind("ENUM"), _kind("RESOURCE")

Decoder = Callable[[int, int], Any]  # (context address, value address) -> Python value
Encoder = Callable[[int, Any, int], None]  # (context address, value, address to fill)


@dataclass(frozen=True)
class Ok:
    """The ok case of a component ``result``."""

    value: Any = None


@dataclass(frozen=True)
class Err:
    """The error case of a component ``result``."""

    value: Any = None


class CodecError(Exception):
    """A value could not be converted (a bad resource handle, a wrong Python value)."""


def resource_error(err: int, what: str) -> None:
    """Free the wasmtime error of a failed resource conversion and raise in its place."""
    ffi.wasmtime_error_delete(ctypes.cast(err, ctypes.POINTER(ffi.wasmtime_error_t)))
    raise CodecError(what)


def _empty_list_value() -> bytes:
    """kind + (size 0, data) exactly as ``vallist_new_uninit(0)`` makes it (no allocation:
    Rust's empty boxed slice holds a dangling, aligned pointer), so empty lists cost no
    C call."""
    probe = ctypes.create_string_buffer(16)
    vallist_new(ctypes.addressof(probe), 0)
    size, data = _PAIR.unpack(probe.raw)
    assert size == 0
    return struct.pack("<B7xQQ", K_LIST, 0, data)


EMPTY_LIST = _empty_list_value()


class Scratch:
    """A value-sized buffer an option/result encoder fills before boxing it; the object
    keeps the buffer alive for as long as the encoder that holds it."""

    def __init__(self) -> None:
        self.buf = ctypes.create_string_buffer(VAL_SIZE)
        self.addr = ctypes.addressof(self.buf)


def pair(addr: int) -> tuple[int, int]:
    size, data = _PAIR.unpack(ctypes.string_at(addr + PAYLOAD, 16))
    return size, data


def scalar_filler(elem: Any) -> Callable[[Any, int], None]:
    """Writes a non-empty list of scalars (kind byte + payload each) over an element array
    of ``len(xs)`` values at ``data``: one copy, built in one buffer."""
    kind, fmt, code = SCALARS[elem.kind]
    width = array(code).itemsize
    first, stride = PAYLOAD // width, VAL_SIZE // width
    one = struct.Struct("<B7x" + fmt)

    def fill(xs: Any, data: int) -> None:
        n = len(xs)
        if n == 1:
            ctypes.memmove(data, one.pack(kind, xs[0]), one.size)
            return
        buf = bytearray(n * VAL_SIZE)
        buf[0::VAL_SIZE] = bytes((kind,)) * n
        memoryview(buf).cast(code)[first::stride] = array(code, xs)  # type: ignore[call-overload]
        ctypes.memmove(data, bytes(buf), len(buf))

    return fill


def _host_rep_offset() -> int | None:
    """Where a ``wasmtime_component_resource_host_t`` keeps its rep, found by probing one
    (never assumed), or None if rewriting it does not show through wasmtime's own
    accessors. Handing a resource to a guest is then one C call instead of three (make
    a host object, convert it, free it): every forward pass hands out two."""
    probe = host_new(True, 0x5EED1234, 0x7E57)
    try:
        raw = ctypes.string_at(probe, 16)  # 50.0.1: state (8 bytes), rep, type
        at = raw.find(struct.pack("<I", 0x5EED1234))
        if at < 0 or at % 4:
            return None
        u32_at(probe + at).value = 0x0BADF00D
        if host_rep(probe) != 0x0BADF00D or host_type(probe) != 0x7E57:
            return None
        return at if host_owned(probe) else None
    finally:
        host_delete(probe)


HOST_REP_OFFSET = _host_rep_offset()


def read_u32(addr: int) -> int:
    return int(u32_at(addr).value)
