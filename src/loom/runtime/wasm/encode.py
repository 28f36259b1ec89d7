"""Python values to guest values: an encoder per WIT type, built once, writing a value
the callee will own into wasmtime's C value structs (layout in ``values``). Values with
records or tuples inside are copied from a template of their shape (``templates``); a
record of scalar lists (a pass's ``forward-output``) starts from one copy of empty
lists; an owned resource reuses one host object with its rep rewritten."""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable
from ctypes import byref, c_void_p
from typing import Any

from loom.runtime.wasm import values
from loom.runtime.wasm.templates import has_fields, templated
from loom.runtime.wasm.values import (
    EMPTY_LIST,
    ENTRY_SIZE,
    ENTRY_VAL,
    K_ENUM,
    K_LIST,
    K_OPTION,
    K_RECORD,
    K_RESOURCE,
    K_RESULT,
    K_STRING,
    K_TUPLE,
    KIND_PTR,
    PAYLOAD,
    SCALARS,
    VAL_SIZE,
    CodecError,
    Encoder,
    Err,
    Ok,
    Scratch,
    byte_vec_new,
    host_delete,
    host_new,
    host_to_any,
    ptr_at,
    resource_error,
    scalar_filler,
    u8_at,
    u32_at,
    val_new,
    vallist_new,
    valrecord_new,
    valtuple_new,
)


def encoder(t: Any, resource_ids: Callable[[str], int]) -> Encoder:
    """A function writing one value of type ``t`` into a value the callee will own.

    Values with records or tuples inside (a pass's outputs, say) are copied from a
    template of the same shape with one C call, and only their scalars are written:
    building one from scratch costs a C call per record field name and per list."""
    plain = _plain_encoder(t, resource_ids)
    if not has_fields(t):
        return plain
    return templated(t, plain) or plain


def _plain_encoder(t: Any, resource_ids: Callable[[str], int]) -> Encoder:
    """``encoder`` building every value from scratch."""
    k = t.kind
    if k in SCALARS:
        kind, fmt, _ = SCALARS[k]
        pack = struct.Struct("<B7x" + fmt).pack
        size = struct.calcsize("<B7x" + fmt)

        def enc_scalar(ctx: int, x: Any, a: int) -> None:
            ctypes.memmove(a, pack(kind, x), size)

        return enc_scalar
    if k == "string":

        def enc_string(ctx: int, x: str, a: int) -> None:
            data = x.encode()
            u8_at(a).value = K_STRING
            byte_vec_new(a + PAYLOAD, len(data), data)

        return enc_string
    if k == "list":
        (elem,) = t.args
        if elem.kind in SCALARS:
            fill = scalar_filler(elem)
            kind, fmt, _ = SCALARS[elem.kind]
            one = struct.Struct("<B7x" + fmt)  # one element: kind byte and payload

            def enc_scalars(ctx: int, xs: Any, a: int) -> None:
                n = len(xs)
                if n == 0:
                    ctypes.memmove(a, EMPTY_LIST, 24)
                    return
                u8_at(a).value = K_LIST
                vallist_new(a + PAYLOAD, n)
                if n == 1:  # a poll's one ready index, say
                    ctypes.memmove(ptr_at(a + PAYLOAD + 8).value, one.pack(kind, xs[0]), one.size)
                    return
                fill(xs, ptr_at(a + PAYLOAD + 8).value)

            return enc_scalars
        eenc = _plain_encoder(elem, resource_ids)

        def enc_list(ctx: int, xs: Any, a: int) -> None:
            n = len(xs)
            if n == 0:
                ctypes.memmove(a, EMPTY_LIST, 24)
                return
            u8_at(a).value = K_LIST
            vallist_new(a + PAYLOAD, n)
            data = ptr_at(a + PAYLOAD + 8).value
            for i in range(n):
                eenc(ctx, xs[i], data + i * VAL_SIZE)

        return enc_list
    if k == "option":
        inner = _plain_encoder(t.args[0], resource_ids)
        scratch = Scratch()  # one per codec node, so nested options never share one

        def enc_option(ctx: int, x: Any, a: int) -> None:
            u8_at(a).value = K_OPTION
            if x is None:
                ptr_at(a + PAYLOAD).value = 0
                return
            inner(ctx, x, scratch.addr)
            ptr_at(a + PAYLOAD).value = val_new(scratch.addr)  # moves the scratch's value

        return enc_option
    if k == "record" and all(x.kind == "list" and x.args[0].kind in SCALARS for _, x in t.args):
        return _list_record_encoder(t, resource_ids)
    if k in ("tuple", "record"):
        is_record = k == "record"
        encs = [_plain_encoder(x[1] if is_record else x, resource_ids) for x in t.args]
        names = [x[0].encode() for x in t.args] if is_record else []
        new = valrecord_new if is_record else valtuple_new
        step, off = (ENTRY_SIZE, ENTRY_VAL) if is_record else (VAL_SIZE, 0)
        kind_rt = K_RECORD if is_record else K_TUPLE

        fields = [(i * step, e, names[i] if is_record else None) for i, e in enumerate(encs)]

        def enc_fields(ctx: int, xs: Any, a: int) -> None:
            u8_at(a).value = kind_rt
            new(a + PAYLOAD, len(fields))
            data = ptr_at(a + PAYLOAD + 8).value
            for (at, e, name), x in zip(fields, xs, strict=True):
                if name is not None:
                    byte_vec_new(data + at, len(name), name)
                e(ctx, x, data + at + off)

        return enc_fields
    if k == "result":
        ok_t, err_t = t.args
        ok_enc = _plain_encoder(ok_t, resource_ids) if ok_t is not None else None
        err_enc = _plain_encoder(err_t, resource_ids) if err_t is not None else None
        scratch = Scratch()

        def enc_result(ctx: int, x: Any, a: int) -> None:
            is_ok = isinstance(x, Ok)
            if not is_ok and not isinstance(x, Err):
                raise CodecError(f"a result value must be Ok or Err, got {x!r}")
            u8_at(a).value = K_RESULT
            u8_at(a + PAYLOAD).value = is_ok
            enc = ok_enc if is_ok else err_enc
            if enc is None:
                ptr_at(a + PAYLOAD + 8).value = 0
                return
            enc(ctx, x.value, scratch.addr)
            ptr_at(a + PAYLOAD + 8).value = val_new(scratch.addr)

        return enc_result
    if k == "enum":
        cases = [n.encode() for n in t.args]

        def enc_enum(ctx: int, x: int, a: int) -> None:
            u8_at(a).value = K_ENUM
            byte_vec_new(a + PAYLOAD, len(cases[x]), cases[x])

        return enc_enum
    if k == "own":
        type_id = resource_ids(t.args[0])
        anyp = c_void_p()
        any_ref = byref(anyp)

        if values.HOST_REP_OFFSET is not None:
            # One host object per encoder, its rep rewritten per value: wasmtime copies
            # rep and type out of it (``host_to_any`` takes it by const pointer).
            host = host_new(True, 0, type_id)
            rep_at = u32_at(host + values.HOST_REP_OFFSET)

            def enc_own_reused(ctx: int, rep: int, a: int) -> None:
                rep_at.value = rep
                err = host_to_any(ctx, host, any_ref)
                if err:
                    resource_error(err, "could not hand a resource to the guest")
                ctypes.memmove(a, KIND_PTR.pack(K_RESOURCE, anyp.value or 0), 16)

            return enc_own_reused

        def enc_own(ctx: int, rep: int, a: int) -> None:
            host = host_new(True, rep, type_id)
            err = host_to_any(ctx, host, any_ref)
            host_delete(host)
            if err:
                resource_error(err, "could not hand a resource to the guest")
            ctypes.memmove(a, KIND_PTR.pack(K_RESOURCE, anyp.value or 0), 16)

        return enc_own
    raise ValueError(f"no encoder for {t}")


def _list_record_encoder(t: Any, resource_ids: Callable[[str], int]) -> Encoder:
    """A record of scalar lists (a pass's ``forward-output``): every field starts as an
    empty list in one copy of a template; then only names and non-empty lists cost calls."""
    names = [n.encode() for n, _ in t.args]
    encs = [_plain_encoder(x, resource_ids) for _, x in t.args]
    # Entry: name (16 bytes, written below), then the value: an empty list.
    template = b"".join(bytes(16) + EMPTY_LIST + bytes(VAL_SIZE - len(EMPTY_LIST)) for _ in names)
    fields = [(i * ENTRY_SIZE, names[i], enc) for i, enc in enumerate(encs)]
    size = len(fields)

    def enc_list_record(ctx: int, xs: Any, a: int) -> None:
        u8_at(a).value = K_RECORD
        valrecord_new(a + PAYLOAD, size)
        data = ptr_at(a + PAYLOAD + 8).value
        ctypes.memmove(data, template, len(template))
        for (at, name, enc), x in zip(fields, xs, strict=True):
            byte_vec_new(data + at, len(name), name)
            if len(x):
                enc(ctx, x, data + at + ENTRY_VAL)

    return enc_list_record
