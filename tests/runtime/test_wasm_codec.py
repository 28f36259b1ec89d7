"""Value codecs against wasmtime's own C value structs (no guest needed).

Every value is encoded into a real ``wasmtime_component_val_t``, read back by the
decoder, checked through wasmtime-py's structure definitions where that is easy, and
then freed by wasmtime (``wasmtime_component_val_delete``): a value the codec built
wrongly would crash or leak there.
"""

from __future__ import annotations

import ctypes
import struct
from typing import Any

import pytest
from wasmtime import _ffi as ffi

from loom.runtime.wasm import values as wasm_values
from loom.runtime.wasm.decode import decoder
from loom.runtime.wasm.encode import encoder
from loom.runtime.wasm.ffi import (
    BOOL,
    F32,
    S64,
    STRING,
    U8,
    U32,
    U64,
    Err,
    Ok,
    Ty,
    enum,
    list_of,
    option,
    record,
    result,
    tuple_of,
)
from loom.runtime.wasm.templates import TEMPLATES_PER_ENCODER


def _no_resources(name: str) -> int:
    raise AssertionError(f"no resources here, asked for {name}")


def roundtrip(t: Ty, value: Any) -> tuple[Any, Any]:
    """Encode ``value`` into a fresh C value, decode it, free it; returns (decoded, val)."""
    val = ffi.wasmtime_component_val_t()
    addr = ctypes.addressof(val)
    encoder(t, _no_resources)(0, value, addr)
    decoded = decoder(t, _no_resources)(0, addr)
    kind = val.kind
    ffi.wasmtime_component_val_delete(ctypes.byref(val))
    return decoded, kind


def test_layout_matches_wasmtime_structs() -> None:
    val = ffi.wasmtime_component_val_t
    entry = ffi.wasmtime_component_valrecord_entry_t
    assert ctypes.sizeof(val) == wasm_values.VAL_SIZE
    assert val.of.offset == wasm_values.PAYLOAD
    assert ctypes.sizeof(entry) == wasm_values.ENTRY_SIZE
    assert entry.val.offset == wasm_values.ENTRY_VAL
    assert ffi.wasmtime_component_vallist_t.data.offset == 8
    assert ffi.wasmtime_component_valresult_t.val.offset == 8


@pytest.mark.parametrize(
    ("t", "value"),
    [
        (U32, 4_000_000_000),
        (U64, (1 << 64) - 1),
        (S64, -(1 << 40)),
        (BOOL, True),
        (STRING, ""),
        (STRING, "héllo, 世界"),
        (list_of(U32), []),
        (list_of(U32), [0, 1, 2**32 - 1]),
        (list_of(F32), [0.5, -2.25]),
        (list_of(BOOL), [True, False, True]),
        (list_of(STRING), ["a", "", "ccc"]),
        (list_of(list_of(U32)), [[1, 2], [], [3]]),
        (option(U32), None),
        (option(U32), 7),
        (option(option(U32)), 9),
        (option(STRING), "x"),
        (tuple_of(U32, F32), (3, 1.5)),
        (list_of(tuple_of(U32, F32)), [(1, 0.25), (2, 0.75)]),
        (enum("low", "normal", "high"), 2),
        (record(("a", U32), ("b", option(F32)), ("c", list_of(U32))), (1, None, [4, 5])),
        (record(("a", U32), ("b", option(F32)), ("c", list_of(U32))), (1, 2.5, [])),
    ],
)
def test_values_roundtrip(t: Ty, value: Any) -> None:
    decoded, _ = roundtrip(t, value)
    assert decoded == value


def test_bytes_decode_as_bytes() -> None:
    decoded, _ = roundtrip(list_of(U8), b"\x00\xffab")
    assert decoded == b"\x00\xffab"


def test_results_carry_ok_and_err() -> None:
    t = result(list_of(U32), STRING)
    val = ffi.wasmtime_component_val_t()
    addr = ctypes.addressof(val)
    enc = encoder(t, _no_resources)
    enc(0, Ok([1, 2]), addr)
    assert val.kind == wasm_values.K_RESULT and val.of.result.is_ok
    inner = val.of.result.val.contents
    assert [inner.of.list.data[i].of.u32 for i in range(inner.of.list.size)] == [1, 2]
    ffi.wasmtime_component_val_delete(ctypes.byref(val))
    enc(0, Err("boom"), addr)
    assert not val.of.result.is_ok
    s = val.of.result.val.contents.of.string
    assert ctypes.string_at(s.data, s.size) == b"boom"
    ffi.wasmtime_component_val_delete(ctypes.byref(val))
    with pytest.raises(wasm_values.CodecError):
        enc(0, [1, 2], addr)  # neither Ok nor Err


def test_record_names_are_written() -> None:
    t = record(("token", U32), ("dist-ids", list_of(U32)))
    val = ffi.wasmtime_component_val_t()
    encoder(t, _no_resources)(0, (5, [6]), ctypes.addressof(val))
    rec = val.of.record
    names = [ctypes.string_at(rec.data[i].name.data, rec.data[i].name.size) for i in range(2)]
    assert names == [b"token", b"dist-ids"]
    assert rec.data[0].val.of.u32 == 5
    ffi.wasmtime_component_val_delete(ctypes.byref(val))


def test_many_encodes_reuse_scratch_safely() -> None:
    # Option and result encoders keep one scratch value per codec node; nesting and reuse
    # across calls must not mix values up.
    t = list_of(option(result(option(U32), STRING)))
    value = [Ok(1), None, Err("e"), Ok(None)] * 50
    for _ in range(20):
        decoded, _ = roundtrip(t, value)
        assert [_as_result(x) for x in decoded] == [_as_result(x) for x in value]


def _as_result(x: Any) -> Any:
    return None if x is None else (type(x).__name__, x.value)


def test_flat_records_decode_with_options_present_and_absent() -> None:
    from loom.runtime.host.types_sampler import SAMPLER

    for value in [(0.0, 0, 1.0, 0.0, None), (0.7, 40, 0.9, 0.05, (1 << 63) + 5)]:
        decoded, _ = roundtrip(SAMPLER, value)
        assert decoded == pytest.approx(value) and decoded[4] == value[4]
    t = record(("a", U8), ("b", option(BOOL)), ("c", S64), ("d", option(F32)))
    for value in [(255, True, -3, None), (0, None, 1 << 40, 0.5), (1, False, 0, -1.0)]:
        decoded, _ = roundtrip(t, value)
        assert decoded == value


def test_records_of_lists_start_from_a_template_of_empty_lists() -> None:
    t = record(("a", list_of(U32)), ("b", list_of(F32)), ("c", list_of(U32)))
    for value in [([17], [], []), ([], [], []), ([1, 2, 3], [0.5], [9])]:
        decoded, kind = roundtrip(t, value)
        assert decoded == value and kind == wasm_values.K_RECORD
    val = ffi.wasmtime_component_val_t()
    encoder(t, _no_resources)(0, ([5], [], []), ctypes.addressof(val))
    rec = val.of.record
    assert [ctypes.string_at(rec.data[i].name.data, rec.data[i].name.size) for i in range(3)] == [
        b"a",
        b"b",
        b"c",
    ]
    ffi.wasmtime_component_val_delete(ctypes.byref(val))


def test_values_with_fields_are_copied_from_templates_of_their_shape() -> None:
    # A pass's outputs: option<result<record of lists, string>>. One encoder sees values
    # of several shapes, in turns, and each decodes to itself (a template patched with
    # another value's scalars, or of the wrong shape, would not).
    out = record(("tokens", list_of(U32)), ("probs", list_of(F32)), ("ids", list_of(U32)))
    t = option(result(out, STRING))
    enc = encoder(t, _no_resources)
    dec = decoder(t, _no_resources)
    values = [
        Ok(([7], [], [])),
        Ok(([8], [], [])),
        Ok(([1, 2, 3], [0.5, 0.25], [4, 5])),
        Err("pass failed"),
        None,
        Ok(([], [], [])),
        Ok(([9], [0.75], [6])),
        Ok(([2**32 - 1, 0, 5], [1.5, -2.0], [0, 1])),
    ]
    val = ffi.wasmtime_component_val_t()
    addr = ctypes.addressof(val)
    for _ in range(3):
        for value in values:
            enc(0, value, addr)
            got = dec(0, addr)
            ffi.wasmtime_component_val_delete(ctypes.byref(val))
            assert _as_result(got) == _as_result(value)
    tuples = encoder(list_of(tuple_of(U32, option(F32))), _no_resources)
    for value in [[(1, None)], [(2, 0.5), (3, None)], [(4, None)], []]:
        tuples(0, value, addr)
        got = decoder(list_of(tuple_of(U32, option(F32))), _no_resources)(0, addr)
        ffi.wasmtime_component_val_delete(ctypes.byref(val))
        assert got == value


def test_templates_are_bounded_and_bad_values_still_fail() -> None:
    t = record(("a", list_of(U32)), ("b", U32))
    enc = encoder(t, _no_resources)
    n = TEMPLATES_PER_ENCODER + 20  # past the cap values are built from scratch
    for length in range(n):
        decoded, _ = roundtrip_with(enc, t, (list(range(length)), length))
        assert decoded == (list(range(length)), length)
    val = ffi.wasmtime_component_val_t()
    # A string where a u32 goes: an error, and the copied template is freed.
    with pytest.raises((TypeError, struct.error)):
        enc(0, (["x"], 1), ctypes.addressof(val))
    with pytest.raises(wasm_values.CodecError):
        encoder(result(t, STRING), _no_resources)(0, (1, 2), ctypes.addressof(val))


def roundtrip_with(enc: Any, t: Ty, value: Any) -> tuple[Any, Any]:
    val = ffi.wasmtime_component_val_t()
    addr = ctypes.addressof(val)
    enc(0, value, addr)
    decoded = decoder(t, _no_resources)(0, addr)
    kind = val.kind
    ffi.wasmtime_component_val_delete(ctypes.byref(val))
    return decoded, kind


@pytest.mark.parametrize("reuse", [True, False])
def test_own_resources_reuse_one_host_object_per_encoder(
    reuse: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With the pinned wasmtime the probe finds the rep inside a host object, so handing
    # out a resource rewrites it instead of making and freeing one each time; every
    # value must still carry its own rep (read back through wasmtime's conversion).
    # Without the probe's confirmation (another wasmtime) each value gets its own object.
    from loom.runtime.wasm.ffi import GuestStore, WasmEngine, own

    assert wasm_values.HOST_REP_OFFSET is not None
    if not reuse:
        monkeypatch.setattr(wasm_values, "HOST_REP_OFFSET", None)
    store = GuestStore(WasmEngine(), memory_limit=1 << 20)
    ids = {"thing": 3}
    enc = encoder(own("thing"), ids.__getitem__)
    dec = decoder(own("thing"), ids.__getitem__)
    vals = [ffi.wasmtime_component_val_t() for _ in range(3)]
    for rep, val in zip([7, 123456, 2**32 - 1], vals, strict=True):
        enc(store.key, rep, ctypes.addressof(val))
    assert [dec(store.key, ctypes.addressof(v)) for v in vals] == [7, 123456, 2**32 - 1]
    for val in vals:
        ffi.wasmtime_component_val_delete(ctypes.byref(val))
