"""Guest values to Python: a decoder per WIT type, built once, reading wasmtime's C
value structs by address (layout in ``values``). Scalar lists are one copy and a strided
view; a flat record (a sampler) is one copy and one unpack."""

from __future__ import annotations

import ctypes
import struct
from array import array
from collections.abc import Callable
from ctypes import byref, c_void_p
from typing import Any

from loom.runtime.wasm.values import (
    CTYPES,
    ENTRY_SIZE,
    ENTRY_VAL,
    PAYLOAD,
    SCALARS,
    VAL_SIZE,
    Decoder,
    Err,
    Ok,
    any_to_host,
    host_delete,
    host_rep,
    pair,
    ptr_at,
    resource_error,
    u8_at,
)


def _flat_field(t: Any) -> bool:
    return t.kind in SCALARS or (t.kind == "option" and t.args[0].kind in SCALARS)


def _flat_record_decoder(fields: list[Any]) -> Decoder:
    """A record of scalars and optional scalars (a sampler, say) read with one copy and
    one unpack; each present option costs one more read."""
    fmt, at = "<", 0
    options: list[tuple[int, Any]] = []  # (field index, ctypes type of the payload)
    for i, t in enumerate(fields):
        target = i * ENTRY_SIZE + ENTRY_VAL + PAYLOAD  # this field's payload
        code = "Q" if t.kind == "option" else SCALARS[t.kind][1]
        fmt += f"{target - at}x{code}"
        at = target + struct.calcsize("<" + code)
        if t.kind == "option":
            options.append((i, CTYPES[t.args[0].kind]))
    layout = struct.Struct(fmt)

    one = options[0] if len(options) == 1 else None

    def dec_flat_record(ctx: int, a: int) -> tuple[Any, ...]:
        data = ptr_at(a + PAYLOAD + 8).value
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
    if k in SCALARS:
        at = CTYPES[k].from_address

        def dec_scalar(ctx: int, a: int) -> Any:
            return at(a + PAYLOAD).value

        return dec_scalar
    if k == "string":

        def dec_string(ctx: int, a: int) -> str:
            n, data = pair(a)
            return ctypes.string_at(data, n).decode() if n else ""

        return dec_string
    if k == "list":
        (elem,) = t.args
        if elem.kind in SCALARS:
            code = SCALARS[elem.kind][2]
            width = array(code).itemsize
            first, stride = PAYLOAD // width, VAL_SIZE // width
            as_bytes = elem.kind == "u8"
            as_bools = elem.kind == "bool"
            one_at = CTYPES[elem.kind].from_address

            def dec_scalars(ctx: int, a: int) -> Any:
                # One copy of the whole element array, then a strided view of the payloads.
                n, data = pair(a)
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
            n, data = pair(a)
            return [edec(ctx, data + i * VAL_SIZE) for i in range(n)]

        return dec_list
    if k == "option":
        inner = decoder(t.args[0], resource_ids)

        def dec_option(ctx: int, a: int) -> Any:
            p = ptr_at(a + PAYLOAD).value
            return inner(ctx, p) if p else None

        return dec_option
    if k == "tuple":
        decs = [decoder(x, resource_ids) for x in t.args]

        def dec_tuple(ctx: int, a: int) -> tuple[Any, ...]:
            _, data = pair(a)
            return tuple(d(ctx, data + i * VAL_SIZE) for i, d in enumerate(decs))

        return dec_tuple
    if k == "record" and all(_flat_field(x) for _, x in t.args):
        return _flat_record_decoder([x for _, x in t.args])
    if k == "record":
        decs = [decoder(x, resource_ids) for _, x in t.args]

        def dec_record(ctx: int, a: int) -> tuple[Any, ...]:
            _, data = pair(a)
            return tuple(d(ctx, data + i * ENTRY_SIZE + ENTRY_VAL) for i, d in enumerate(decs))

        return dec_record
    if k == "result":
        ok_d, err_d = (decoder(x, resource_ids) if x is not None else None for x in t.args)

        def dec_result(ctx: int, a: int) -> Ok | Err:
            is_ok = bool(u8_at(a + PAYLOAD).value)
            p = ptr_at(a + PAYLOAD + 8).value
            d = ok_d if is_ok else err_d
            value = d(ctx, p) if d is not None and p else None
            return Ok(value) if is_ok else Err(value)

        return dec_result
    if k == "enum":
        names = {n.encode(): i for i, n in enumerate(t.args)}

        def dec_enum(ctx: int, a: int) -> int:
            n, data = pair(a)
            return names[ctypes.string_at(data, n)]

        return dec_enum
    if k in ("borrow", "own"):
        host = c_void_p()
        host_ref = byref(host)

        def dec_resource(ctx: int, a: int) -> int:
            err = any_to_host(ctx, ptr_at(a + PAYLOAD).value, host_ref)
            if err:
                resource_error(err, "not a resource of this host")
            rep = int(host_rep(host))
            host_delete(host)
            return rep

        return dec_resource
    raise ValueError(f"no decoder for {t}")
