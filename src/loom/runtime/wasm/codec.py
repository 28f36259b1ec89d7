"""Component value codecs that read and write wasmtime's C value structs by address.

Part of the wasmtime C-API layer with ``ffi`` (which owns engines, linkers, stores
and calls); this module only converts values. A host call's arguments arrive as an array
of ``wasmtime_component_val_t`` and its result is written into one, so every guest call
pays for these conversions. Building ctypes structure objects for every field cost
30–80 µs per forward pass; here a value is an integer address and fields are read with
one ``from_address`` or one ``string_at`` + ``memoryview`` slice, and the C helpers are
called through ``PYFUNCTYPE`` prototypes on plain ``void*`` (no argument checking, no
GIL release: they never block and never call back).

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
from ctypes import byref, c_bool, c_size_t, c_uint8, c_uint32, c_void_p
from dataclasses import dataclass
from typing import Any

from wasmtime import _ffi as ffi

VAL_SIZE = 32  # sizeof(wasmtime_component_val_t)
PAYLOAD = 8  # offset of the union inside a value
ENTRY_SIZE = 48  # sizeof(wasmtime_component_valrecord_entry_t)
ENTRY_VAL = 16  # offset of the value inside a record entry

_P = ctypes.PYFUNCTYPE
_V = c_void_p
_any_to_host = _P(_V, _V, _V, _V)(("wasmtime_component_resource_any_to_host", ffi.dll))
_host_rep = _P(c_uint32, _V)(("wasmtime_component_resource_host_rep", ffi.dll))
_host_delete = _P(None, _V)(("wasmtime_component_resource_host_delete", ffi.dll))
_host_new = _P(_V, c_bool, c_uint32, c_uint32)(("wasmtime_component_resource_host_new", ffi.dll))
_host_type = _P(c_uint32, _V)(("wasmtime_component_resource_host_type", ffi.dll))
_host_owned = _P(c_bool, _V)(("wasmtime_component_resource_host_owned", ffi.dll))
_host_to_any = _P(_V, _V, _V, _V)(("wasmtime_component_resource_host_to_any", ffi.dll))
_vallist_new = _P(None, _V, c_size_t)(("wasmtime_component_vallist_new_uninit", ffi.dll))
_valrecord_new = _P(None, _V, c_size_t)(("wasmtime_component_valrecord_new_uninit", ffi.dll))
_valtuple_new = _P(None, _V, c_size_t)(("wasmtime_component_valtuple_new_uninit", ffi.dll))
_val_new = _P(_V, _V)(("wasmtime_component_val_new", ffi.dll))
_val_clone = _P(None, _V, _V)(("wasmtime_component_val_clone", ffi.dll))
_val_delete = _P(None, _V)(("wasmtime_component_val_delete", ffi.dll))
_byte_vec_new = _P(None, _V, c_size_t, ctypes.c_char_p)(("wasm_byte_vec_new", ffi.dll))
error_new = _P(_V, ctypes.c_char_p)(("wasmtime_error_new", ffi.dll))

_u8_at = c_uint8.from_address
_u32_at = c_uint32.from_address
_ptr_at = c_size_t.from_address
_PAIR = struct.Struct("<QQ")  # (size, data) of a list, string or name
_KIND_PTR = struct.Struct("<B7xQ")  # a value's kind and a pointer payload


def _kind(name: str) -> int:
    return int(getattr(ffi, f"WASMTIME_COMPONENT_{name}").value)


# scalar kind name -> (component kind, struct format of the payload, array typecode)
_SCALARS: dict[str, tuple[int, str, str]] = {
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
_CTYPES: dict[str, Any] = {
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
    _vallist_new(ctypes.addressof(probe), 0)
    size, data = _PAIR.unpack(probe.raw)
    assert size == 0
    return struct.pack("<B7xQQ", K_LIST, 0, data)


_EMPTY_LIST = _empty_list_value()


class _Scratch:
    """A value-sized buffer an option/result encoder fills before boxing it; the object
    keeps the buffer alive for as long as the encoder that holds it."""

    def __init__(self) -> None:
        self.buf = ctypes.create_string_buffer(VAL_SIZE)
        self.addr = ctypes.addressof(self.buf)


def _pair(addr: int) -> tuple[int, int]:
    size, data = _PAIR.unpack(ctypes.string_at(addr + PAYLOAD, 16))
    return size, data


def _flat_field(t: Any) -> bool:
    return t.kind in _SCALARS or (t.kind == "option" and t.args[0].kind in _SCALARS)


def _flat_record_decoder(fields: list[Any]) -> Decoder:
    """A record of scalars and optional scalars (a sampler, say) read with one copy and
    one unpack; each present option costs one more read."""
    fmt, at = "<", 0
    options: list[tuple[int, Any]] = []  # (field index, ctypes type of the payload)
    for i, t in enumerate(fields):
        target = i * ENTRY_SIZE + ENTRY_VAL + PAYLOAD  # this field's payload
        code = "Q" if t.kind == "option" else _SCALARS[t.kind][1]
        fmt += f"{target - at}x{code}"
        at = target + struct.calcsize("<" + code)
        if t.kind == "option":
            options.append((i, _CTYPES[t.args[0].kind]))
    layout = struct.Struct(fmt)

    one = options[0] if len(options) == 1 else None

    def dec_flat_record(ctx: int, a: int) -> tuple[Any, ...]:
        data = _ptr_at(a + PAYLOAD + 8).value
        vals = layout.unpack(ctypes.string_at(data, layout.size))
        if not options:
            return vals
        if one is not None:  # a sampler: its seed
            i, ctype = one
            p = vals[i]
            return (*vals[:i], ctype.from_address(p + PAYLOAD).value if p else None,
                    *vals[i + 1 :])  # fmt: skip
        out = list(vals)
        for i, ctype in options:
            p = out[i]
            out[i] = ctype.from_address(p + PAYLOAD).value if p else None
        return tuple(out)

    return dec_flat_record


def decoder(t: Any, resource_ids: Callable[[str], int]) -> Decoder:
    """A function reading one value of type ``t`` (a ``wasm_ffi.Ty``); the value stays
    owned by the caller."""
    k = t.kind
    if k in _SCALARS:
        at = _CTYPES[k].from_address

        def dec_scalar(ctx: int, a: int) -> Any:
            return at(a + PAYLOAD).value

        return dec_scalar
    if k == "string":

        def dec_string(ctx: int, a: int) -> str:
            n, data = _pair(a)
            return ctypes.string_at(data, n).decode() if n else ""

        return dec_string
    if k == "list":
        (elem,) = t.args
        if elem.kind in _SCALARS:
            code = _SCALARS[elem.kind][2]
            width = array(code).itemsize
            first, stride = PAYLOAD // width, VAL_SIZE // width
            as_bytes = elem.kind == "u8"
            as_bools = elem.kind == "bool"
            one_at = _CTYPES[elem.kind].from_address

            def dec_scalars(ctx: int, a: int) -> Any:
                # One copy of the whole element array, then a strided view of the payloads.
                n, data = _pair(a)
                if n == 0:
                    return b"" if as_bytes else []
                if n == 1 and not as_bytes:  # the decode step's single token: one read
                    return [one_at(data + PAYLOAD).value]
                view = memoryview(ctypes.string_at(data, n * VAL_SIZE)).cast(code)  # type: ignore[call-overload]
                vals = view[first::stride]
                if as_bytes:
                    return vals.tobytes()
                return [bool(x) for x in vals.tolist()] if as_bools else vals.tolist()

            return dec_scalars
        edec = decoder(elem, resource_ids)

        def dec_list(ctx: int, a: int) -> list[Any]:
            n, data = _pair(a)
            return [edec(ctx, data + i * VAL_SIZE) for i in range(n)]

        return dec_list
    if k == "option":
        inner = decoder(t.args[0], resource_ids)

        def dec_option(ctx: int, a: int) -> Any:
            p = _ptr_at(a + PAYLOAD).value
            return inner(ctx, p) if p else None

        return dec_option
    if k == "tuple":
        decs = [decoder(x, resource_ids) for x in t.args]

        def dec_tuple(ctx: int, a: int) -> tuple[Any, ...]:
            _, data = _pair(a)
            return tuple(d(ctx, data + i * VAL_SIZE) for i, d in enumerate(decs))

        return dec_tuple
    if k == "record" and all(_flat_field(x) for _, x in t.args):
        return _flat_record_decoder([x for _, x in t.args])
    if k == "record":
        decs = [decoder(x, resource_ids) for _, x in t.args]

        def dec_record(ctx: int, a: int) -> tuple[Any, ...]:
            _, data = _pair(a)
            return tuple(d(ctx, data + i * ENTRY_SIZE + ENTRY_VAL) for i, d in enumerate(decs))

        return dec_record
    if k == "result":
        ok_d, err_d = (decoder(x, resource_ids) if x is not None else None for x in t.args)

        def dec_result(ctx: int, a: int) -> Ok | Err:
            is_ok = bool(_u8_at(a + PAYLOAD).value)
            p = _ptr_at(a + PAYLOAD + 8).value
            d = ok_d if is_ok else err_d
            value = d(ctx, p) if d is not None and p else None
            return Ok(value) if is_ok else Err(value)

        return dec_result
    if k == "enum":
        names = {n.encode(): i for i, n in enumerate(t.args)}

        def dec_enum(ctx: int, a: int) -> int:
            n, data = _pair(a)
            return names[ctypes.string_at(data, n)]

        return dec_enum
    if k in ("borrow", "own"):
        host = c_void_p()
        host_ref = byref(host)

        def dec_resource(ctx: int, a: int) -> int:
            err = _any_to_host(ctx, _ptr_at(a + PAYLOAD).value, host_ref)
            if err:
                resource_error(err, "not a resource of this host")
            rep = int(_host_rep(host))
            _host_delete(host)
            return rep

        return dec_resource
    raise ValueError(f"no decoder for {t}")


def _scalar_filler(elem: Any) -> Callable[[Any, int], None]:
    """Writes a non-empty list of scalars (kind byte + payload each) over an element array
    of ``len(xs)`` values at ``data``: one copy, built in one buffer."""
    kind, fmt, code = _SCALARS[elem.kind]
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


def encoder(t: Any, resource_ids: Callable[[str], int]) -> Encoder:
    """A function writing one value of type ``t`` into a value the callee will own.

    Values with records or tuples inside (a pass's outputs, say) are copied from a
    template of the same shape with one C call, and only their scalars are written:
    building one from scratch costs a C call per record field name and per list."""
    plain = _plain_encoder(t, resource_ids)
    if not _has_fields(t):
        return plain
    return _templated(t, plain) or plain


TEMPLATES_PER_ENCODER = 64  # shapes kept per encoder; values of other shapes are built


class _NotShaped(Exception):
    """A value the template path does not take (an error string, a wrong type)."""


def _not_shaped() -> Any:
    raise _NotShaped


def _has_fields(t: Any) -> bool:
    return t.kind in ("record", "tuple") or any(_has_fields(x) for x in _children(t))


def _children(t: Any) -> list[Any]:
    """The value types directly inside ``t``."""
    if t.kind == "record":
        return [x for _, x in t.args]
    if t.kind in ("list", "option", "tuple", "result"):
        return [x for x in t.args if x is not None]
    return []


class _ShapeSource:
    """Source text of a templated encoder: an expression for a value's shape (what
    decides its C layout: list lengths, option and result cases) and statements writing
    its scalars into a copy of the template of that shape. One generated function per
    encoder: the encoder runs right after a guest, with cold caches, where every Python
    function entered costs about a microsecond."""

    def __init__(self) -> None:
        self.ns: dict[str, Any] = {"_ptr_at": _ptr_at, "_Ok": Ok, "_Err": Err,
                                   "_not_shaped": _not_shaped}  # fmt: skip
        self._n = 0

    def name(self, prefix: str, value: Any = None) -> str:
        self._n += 1
        name = f"{prefix}{self._n}"
        if value is not None:
            self.ns[name] = value
        return name

    def node(self, t: Any, v: str) -> tuple[str, Callable[[str], list[str]]] | None:
        """(shape expression of the value ``v``, statements patching it at an address
        expression), or None where ``t`` holds strings, enums or resources."""
        k = t.kind
        if k in _SCALARS:
            at = self.name("_at", _CTYPES[k].from_address)
            return "0", lambda a: [f"{at}({a} + {PAYLOAD}).value = {v}"]
        if k == "list":
            if t.args[0].kind not in _SCALARS:
                return None
            fill = self.name("_fill", _scalar_filler(t.args[0]))
            one = self.name("_at", _CTYPES[t.args[0].kind].from_address)
            return f"len({v})", lambda a: [
                f"if len({v}) == 1:  # the template holds the kind byte",
                f"    {one}(_ptr_at({a} + {PAYLOAD + 8}).value + {PAYLOAD}).value = {v}[0]",
                f"elif {v}:",
                f"    {fill}({v}, _ptr_at({a} + {PAYLOAD + 8}).value)",
            ]
        if k in ("record", "tuple"):
            return self._fields(t, v)
        if k == "option":
            inner = self.node(t.args[0], v)
            if inner is None:
                return None
            shape_in, patch_in = inner
            o = self.name("o")
            return f"(None if {v} is None else ({shape_in},))", lambda a: [
                f"if {v} is not None:",
                f"    {o} = _ptr_at({a} + {PAYLOAD}).value",
                *(f"    {line}" for line in patch_in(o)),
            ]
        if k == "result":
            return self._result(t, v)
        return None

    def _fields(self, t: Any, v: str) -> tuple[str, Callable[[str], list[str]]] | None:
        types = _children(t)
        step, off = (ENTRY_SIZE, ENTRY_VAL) if t.kind == "record" else (VAL_SIZE, 0)
        kids = [self.node(x, f"{v}[{i}]") for i, x in enumerate(types)]
        if any(kid is None for kid in kids):
            return None
        n = len(types)
        if all(x.kind == "list" for x in types):
            shape = f"(tuple(map(len, {v})) if len({v}) == {n} else _not_shaped())"
        else:
            parts = "".join(f"{kid[0]}, " for kid in kids if kid is not None)
            shape = f"(({parts}) if len({v}) == {n} else _not_shaped())"
        d = self.name("d")

        def patch(a: str) -> list[str]:
            lines = [f"{d} = _ptr_at({a} + {PAYLOAD + 8}).value"]
            for i, kid in enumerate(kids):
                assert kid is not None
                lines += kid[1](f"{d} + {i * step + off}")
            return lines

        return shape, patch

    def _result(self, t: Any, v: str) -> tuple[str, Callable[[str], list[str]]] | None:
        sides = [self.node(x, f"{v}.value") if x is not None else None for x in t.args]
        takes = [x is None or side is not None for x, side in zip(t.args, sides, strict=True)]
        if not any(takes):
            return None
        shapes = [
            (side[0] if side is not None else "None") if ok else "_not_shaped()"
            for side, ok in zip(sides, takes, strict=True)
        ]
        shape = (
            f"((True, {shapes[0]}) if type({v}) is _Ok else (False, {shapes[1]}) "
            f"if type({v}) is _Err else _not_shaped())"
        )
        r = self.name("r")

        def patch(a: str) -> list[str]:
            lines = []
            for case, side in zip(("_Ok", "_Err"), sides, strict=True):
                if side is not None:
                    lines += [
                        f"if type({v}) is {case}:",
                        f"    {r} = _ptr_at({a} + {PAYLOAD + 8}).value",
                        *(f"    {line}" for line in side[1](r)),
                    ]
            return lines

        return shape, patch


def _templated(t: Any, plain: Encoder) -> Encoder | None:
    src = _ShapeSource()
    node = src.node(t, "x")
    if node is None:
        return None
    shape, patch = node
    templates: dict[Any, tuple[Any, int]] = {}  # shape -> (buffer kept alive, its address)

    def new_template(ctx: int, x: Any, key: Any) -> int:
        """The template for ``x``'s shape, built from ``x``; 0 once the cap is reached."""
        if len(templates) >= TEMPLATES_PER_ENCODER:
            return 0
        buf = ctypes.create_string_buffer(VAL_SIZE)
        plain(ctx, x, ctypes.addressof(buf))  # owned by the encoder from now on
        templates[key] = (buf, ctypes.addressof(buf))
        return ctypes.addressof(buf)

    src.ns.update(_plain=plain, _templates=templates, _new_template=new_template,
                  _clone=_val_clone, _delete=_val_delete, _NotShaped=_NotShaped)  # fmt: skip
    lines = [
        "def enc_templated(ctx, x, a):",
        "    try:",
        f"        key = {shape}",
        "    except (_NotShaped, TypeError):",
        "        _plain(ctx, x, a)  # builds it, or raises the plain encoder's error",
        "        return",
        "    tpl = _templates.get(key)",
        "    tpl = tpl[1] if tpl is not None else _new_template(ctx, x, key)",
        "    if not tpl:",
        "        _plain(ctx, x, a)",
        "        return",
        "    _clone(tpl, a)",
        "    try:",
        *(f"        {line}" for line in patch("a")),
        "    except BaseException:",
        "        _delete(a)",
        "        raise",
    ]
    exec(compile("\n".join(lines), f"<encoder of {t.kind}>", "exec"), src.ns)
    enc: Encoder = src.ns["enc_templated"]
    return enc


def _plain_encoder(t: Any, resource_ids: Callable[[str], int]) -> Encoder:
    """``encoder`` building every value from scratch."""
    k = t.kind
    if k in _SCALARS:
        kind, fmt, _ = _SCALARS[k]
        pack = struct.Struct("<B7x" + fmt).pack
        size = struct.calcsize("<B7x" + fmt)

        def enc_scalar(ctx: int, x: Any, a: int) -> None:
            ctypes.memmove(a, pack(kind, x), size)

        return enc_scalar
    if k == "string":

        def enc_string(ctx: int, x: str, a: int) -> None:
            data = x.encode()
            _u8_at(a).value = K_STRING
            _byte_vec_new(a + PAYLOAD, len(data), data)

        return enc_string
    if k == "list":
        (elem,) = t.args
        if elem.kind in _SCALARS:
            fill = _scalar_filler(elem)
            kind, fmt, _ = _SCALARS[elem.kind]
            one = struct.Struct("<B7x" + fmt)  # one element: kind byte and payload

            def enc_scalars(ctx: int, xs: Any, a: int) -> None:
                n = len(xs)
                if n == 0:
                    ctypes.memmove(a, _EMPTY_LIST, 24)
                    return
                _u8_at(a).value = K_LIST
                _vallist_new(a + PAYLOAD, n)
                if n == 1:  # a poll's one ready index, say
                    ctypes.memmove(_ptr_at(a + PAYLOAD + 8).value, one.pack(kind, xs[0]), one.size)
                    return
                fill(xs, _ptr_at(a + PAYLOAD + 8).value)

            return enc_scalars
        eenc = _plain_encoder(elem, resource_ids)

        def enc_list(ctx: int, xs: Any, a: int) -> None:
            n = len(xs)
            if n == 0:
                ctypes.memmove(a, _EMPTY_LIST, 24)
                return
            _u8_at(a).value = K_LIST
            _vallist_new(a + PAYLOAD, n)
            data = _ptr_at(a + PAYLOAD + 8).value
            for i in range(n):
                eenc(ctx, xs[i], data + i * VAL_SIZE)

        return enc_list
    if k == "option":
        inner = _plain_encoder(t.args[0], resource_ids)
        scratch = _Scratch()  # one per codec node, so nested options never share one

        def enc_option(ctx: int, x: Any, a: int) -> None:
            _u8_at(a).value = K_OPTION
            if x is None:
                _ptr_at(a + PAYLOAD).value = 0
                return
            inner(ctx, x, scratch.addr)
            _ptr_at(a + PAYLOAD).value = _val_new(scratch.addr)  # moves the scratch's value

        return enc_option
    if k == "record" and all(x.kind == "list" and x.args[0].kind in _SCALARS for _, x in t.args):
        return _list_record_encoder(t, resource_ids)
    if k in ("tuple", "record"):
        is_record = k == "record"
        encs = [_plain_encoder(x[1] if is_record else x, resource_ids) for x in t.args]
        names = [x[0].encode() for x in t.args] if is_record else []
        new = _valrecord_new if is_record else _valtuple_new
        step, off = (ENTRY_SIZE, ENTRY_VAL) if is_record else (VAL_SIZE, 0)
        kind_rt = K_RECORD if is_record else K_TUPLE

        fields = [(i * step, e, names[i] if is_record else None) for i, e in enumerate(encs)]

        def enc_fields(ctx: int, xs: Any, a: int) -> None:
            _u8_at(a).value = kind_rt
            new(a + PAYLOAD, len(fields))
            data = _ptr_at(a + PAYLOAD + 8).value
            for (at, e, name), x in zip(fields, xs, strict=True):
                if name is not None:
                    _byte_vec_new(data + at, len(name), name)
                e(ctx, x, data + at + off)

        return enc_fields
    if k == "result":
        ok_t, err_t = t.args
        ok_enc = _plain_encoder(ok_t, resource_ids) if ok_t is not None else None
        err_enc = _plain_encoder(err_t, resource_ids) if err_t is not None else None
        scratch = _Scratch()

        def enc_result(ctx: int, x: Any, a: int) -> None:
            is_ok = isinstance(x, Ok)
            if not is_ok and not isinstance(x, Err):
                raise CodecError(f"a result value must be Ok or Err, got {x!r}")
            _u8_at(a).value = K_RESULT
            _u8_at(a + PAYLOAD).value = is_ok
            enc = ok_enc if is_ok else err_enc
            if enc is None:
                _ptr_at(a + PAYLOAD + 8).value = 0
                return
            enc(ctx, x.value, scratch.addr)
            _ptr_at(a + PAYLOAD + 8).value = _val_new(scratch.addr)

        return enc_result
    if k == "enum":
        cases = [n.encode() for n in t.args]

        def enc_enum(ctx: int, x: int, a: int) -> None:
            _u8_at(a).value = K_ENUM
            _byte_vec_new(a + PAYLOAD, len(cases[x]), cases[x])

        return enc_enum
    if k == "own":
        type_id = resource_ids(t.args[0])
        anyp = c_void_p()
        any_ref = byref(anyp)

        if HOST_REP_OFFSET is not None:
            # One host object per encoder, its rep rewritten per value: wasmtime copies
            # rep and type out of it (``host_to_any`` takes it by const pointer).
            host = _host_new(True, 0, type_id)
            rep_at = _u32_at(host + HOST_REP_OFFSET)

            def enc_own_reused(ctx: int, rep: int, a: int) -> None:
                rep_at.value = rep
                err = _host_to_any(ctx, host, any_ref)
                if err:
                    resource_error(err, "could not hand a resource to the guest")
                ctypes.memmove(a, _KIND_PTR.pack(K_RESOURCE, anyp.value or 0), 16)

            return enc_own_reused

        def enc_own(ctx: int, rep: int, a: int) -> None:
            host = _host_new(True, rep, type_id)
            err = _host_to_any(ctx, host, any_ref)
            _host_delete(host)
            if err:
                resource_error(err, "could not hand a resource to the guest")
            ctypes.memmove(a, _KIND_PTR.pack(K_RESOURCE, anyp.value or 0), 16)

        return enc_own
    raise ValueError(f"no encoder for {t}")


def _host_rep_offset() -> int | None:
    """Where a ``wasmtime_component_resource_host_t`` keeps its rep, found by probing one
    (never assumed), or None if rewriting it does not show through wasmtime's own
    accessors. Handing a resource to a guest is then one C call instead of three (make
    a host object, convert it, free it): every forward pass hands out two."""
    probe = _host_new(True, 0x5EED1234, 0x7E57)
    try:
        raw = ctypes.string_at(probe, 16)  # 50.0.1: state (8 bytes), rep, type
        at = raw.find(struct.pack("<I", 0x5EED1234))
        if at < 0 or at % 4:
            return None
        _u32_at(probe + at).value = 0x0BADF00D
        if _host_rep(probe) != 0x0BADF00D or _host_type(probe) != 0x7E57:
            return None
        return at if _host_owned(probe) else None
    finally:
        _host_delete(probe)


HOST_REP_OFFSET = _host_rep_offset()

# For the generated host-function callbacks (``wasm_trampoline``).
any_to_host, host_to_any, host_rep = _any_to_host, _host_to_any, _host_rep
host_new, host_delete = _host_new, _host_delete
KIND_PTR = _KIND_PTR
SCALAR_CTYPES = _CTYPES


def _list_record_encoder(t: Any, resource_ids: Callable[[str], int]) -> Encoder:
    """A record of scalar lists (a pass's ``forward-output``): every field starts as an
    empty list in one copy of a template; then only names and non-empty lists cost calls."""
    names = [n.encode() for n, _ in t.args]
    encs = [_plain_encoder(x, resource_ids) for _, x in t.args]
    # Entry: name (16 bytes, written below), then the value: an empty list.
    template = b"".join(bytes(16) + _EMPTY_LIST + bytes(VAL_SIZE - len(_EMPTY_LIST)) for _ in names)
    fields = [(i * ENTRY_SIZE, names[i], enc) for i, enc in enumerate(encs)]
    size = len(fields)

    def enc_list_record(ctx: int, xs: Any, a: int) -> None:
        _u8_at(a).value = K_RECORD
        _valrecord_new(a + PAYLOAD, size)
        data = _ptr_at(a + PAYLOAD + 8).value
        ctypes.memmove(data, template, len(template))
        for (at, name, enc), x in zip(fields, xs, strict=True):
            _byte_vec_new(data + at, len(name), name)
            if len(x):
                enc(ctx, x, data + at + ENTRY_VAL)

    return enc_list_record


def read_u32(addr: int) -> int:
    return int(_u32_at(addr).value)
