"""Templated encoders: a value with records or tuples inside (a pass's outputs, say) is
written as one C copy of a template of its shape plus its scalars, by a function
generated for the type. Building one from scratch costs a C call per record field name
and per list."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

from loom.runtime.wasm.values import (
    CTYPES,
    ENTRY_SIZE,
    ENTRY_VAL,
    PAYLOAD,
    SCALARS,
    VAL_SIZE,
    Encoder,
    Err,
    Ok,
    ptr_at,
    scalar_filler,
    val_clone,
    val_delete,
)

TEMPLATES_PER_ENCODER = 64  # shapes kept per encoder; values of other shapes are built


class _NotShaped(Exception):
    """A value the template path does not take (an error string, a wrong type)."""


def _not_shaped() -> Any:
    raise _NotShaped


def has_fields(t: Any) -> bool:
    return t.kind in ("record", "tuple") or any(has_fields(x) for x in _children(t))


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
        self.ns: dict[str, Any] = {"ptr_at": ptr_at, "_Ok": Ok, "_Err": Err,
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
        if k in SCALARS:
            at = self.name("_at", CTYPES[k].from_address)
            return "0", lambda a: [f"{at}({a} + {PAYLOAD}).value = {v}"]
        if k == "list":
            if t.args[0].kind not in SCALARS:
                return None
            fill = self.name("_fill", scalar_filler(t.args[0]))
            one = self.name("_at", CTYPES[t.args[0].kind].from_address)
            return f"len({v})", lambda a: [
                f"if len({v}) == 1:  # the template holds the kind byte",
                f"    {one}(ptr_at({a} + {PAYLOAD + 8}).value + {PAYLOAD}).value = {v}[0]",
                f"elif {v}:",
                f"    {fill}({v}, ptr_at({a} + {PAYLOAD + 8}).value)",
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
                f"    {o} = ptr_at({a} + {PAYLOAD}).value",
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
            lines = [f"{d} = ptr_at({a} + {PAYLOAD + 8}).value"]
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
                        f"    {r} = ptr_at({a} + {PAYLOAD + 8}).value",
                        *(f"    {line}" for line in side[1](r)),
                    ]
            return lines

        return shape, patch


def templated(t: Any, plain: Encoder) -> Encoder | None:
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
                  _clone=val_clone, _delete=val_delete, _NotShaped=_NotShaped)  # fmt: skip
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
