"""Settings as dataclass fields that carry their own documentation.

A setting is a field made with ``setting``: its default, a help line, and optionally
the name it goes by on the command line and in TOML files (``name``; the field's own
name otherwise), the values it accepts (``choices``) and how it is given on the command
line (``repeat``: a flag given once per value; ``many``: a flag followed by values;
``const``: the value of the flag given bare, its value optional).
``flags`` turns the settings of config classes into ``argparse`` flags and ``load``
builds those classes from defaults, a TOML file and flags, in that order of precedence.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

T = TypeVar("T")


def setting(
    default: Any,
    help: str,
    *,
    name: str | None = None,
    choices: Iterable[Any] | None = None,
    repeat: bool = False,
    many: bool = False,
    const: Any = None,
) -> Any:
    """A documented dataclass field (see the module docstring)."""
    meta = {"help": help, "name": name, "choices": tuple(choices) if choices else None,
            "repeat": repeat, "many": many, "const": const}  # fmt: skip
    if isinstance(default, (list, dict, set)):
        raise TypeError("settings are frozen: give a tuple, not a mutable default")
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class Setting:
    """One setting of a config class, as the command line and TOML files know it."""

    section: type  # the config class
    field: str  # its field name there
    name: str  # TOML key and ``argparse`` dest
    default: Any
    help: str
    kind: type  # bool, int, float, str or tuple (of str)
    choices: tuple[Any, ...] | None
    repeat: bool
    many: bool
    const: Any = None

    @property
    def flag(self) -> str:
        return "--" + (self.name[:-1] if self.repeat else self.name).replace("_", "-")


def settings_of(cls: type) -> list[Setting]:
    """The settings of one config class, in field order."""
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        kind = _kind(hints[f.name])
        choices = f.metadata["choices"]
        if choices is None and typing.get_origin(hints[f.name]) is Literal:
            choices = typing.get_args(hints[f.name])
        found.append(Setting(cls, f.name, f.metadata["name"] or f.name, f.default,
                             f.metadata["help"], kind, choices,
                             f.metadata["repeat"], f.metadata["many"],
                             f.metadata.get("const")))  # fmt: skip
    return found


def _kind(hint: Any) -> type:
    """The value kind of a field's type hint (``X | None`` counts as ``X``)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin is Literal:
        return type(typing.get_args(hint)[0])
    if origin is tuple:
        return tuple
    return hint  # type: ignore[no-any-return]


def _describe(s: Setting) -> str:
    if s.default is None or s.default == ():
        return s.help
    shown = s.default
    if isinstance(shown, bool):
        shown = "on" if shown else "off"
    return f"{s.help} (default: {shown})"


def add_flags(parser: argparse.ArgumentParser, *classes: type) -> None:
    """One flag per setting of ``classes``; every flag defaults to None, so that only
    the flags given override a file's values (the defaults are shown in the help)."""
    for cls in classes:
        title = cls.__name__.removesuffix("Config").lower() + " settings"
        group = parser.add_argument_group(title, (cls.__doc__ or "").split("\n")[0])
        for s in settings_of(cls):
            kw: dict[str, Any] = {"dest": s.name, "default": None, "help": _describe(s)}
            if s.kind is bool:
                kw["action"] = argparse.BooleanOptionalAction
            elif s.kind is tuple:
                kw["action"] = "append" if s.repeat else "store"
                kw["metavar"] = s.flag[2:].upper().replace("-", "_")
                if s.many:
                    kw["nargs"] = "*"
            else:
                kw["type"] = s.kind
            if s.const is not None:
                kw.update(nargs="?", const=s.const)
            if s.choices is not None:
                kw["choices"] = s.choices
            group.add_argument(s.flag, **kw)


def names(*classes: type) -> list[str]:
    return [s.name for cls in classes for s in settings_of(cls)]


def build(cls: type[T], values: Mapping[str, Any]) -> T:
    """``cls`` from settings by name (TOML keys); lists become tuples."""
    kw = {}
    for s in settings_of(cls):
        if s.name in values:
            v = values[s.name]
            kw[s.field] = tuple(v) if s.kind is tuple and v is not None else v
    return cls(**kw)


def read_toml(path: str | Path, known: Iterable[str]) -> dict[str, Any]:
    """A TOML file of settings (flat keys); unknown keys are an error."""
    with open(path, "rb") as f:
        data = tomllib.load(f)
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {', '.join(unknown)}")
    return data


def merged(path: str | Path | None, overrides: Mapping[str, Any], known: list[str]) -> dict:
    """Settings by name: a TOML file's (if any), then the non-None ``overrides``."""
    values: dict[str, Any] = dict(read_toml(path, known)) if path is not None else {}
    values.update({k: v for k, v in overrides.items() if v is not None and k in known})
    return values
