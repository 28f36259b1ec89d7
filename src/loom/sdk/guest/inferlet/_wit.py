"""The generated bindings of ``loom:inferlet@0.1.0`` (present only inside a built inferlet;
outside one, stand-ins that say so when called)."""

from typing import Any

try:
    from componentize_py_types import Err as Err
    from wit_world.imports import forward as forward
    from wit_world.imports import generate as generate
    from wit_world.imports import grammar as grammar
    from wit_world.imports import http as http
    from wit_world.imports import kv as kv
    from wit_world.imports import log as log
    from wit_world.imports import messaging as messaging
    from wit_world.imports import model as wit_model
    from wit_world.imports import queue as queue
    from wit_world.imports import runtime as runtime
    from wit_world.imports import store as store
    from wit_world.imports import types as types
except ImportError:  # natively: importable for editors and type checkers, not callable
    from inferlet._outside import (
        Err,
        forward,
        generate,
        grammar,
        http,
        kv,
        log,
        messaging,
        queue,
        runtime,
        store,
        types,
        wit_model,
    )

__all__ = [
    "Err", "forward", "generate", "grammar", "http", "kv", "log", "messaging", "queue", "runtime",
    "store", "types", "unwrap", "wit_model",
]  # fmt: skip


def unwrap(value: Any) -> Any:
    """The value of an ``Ok``; raise ``RuntimeError`` for an ``Err`` (nested results)."""
    kind = type(value).__name__
    if kind == "Err":
        raise RuntimeError(str(value.value))
    if kind == "Ok":
        return value.value
    return value
