"""Stand-ins for the generated bindings outside a built inferlet (an editor, a type
checker, a test importing the SDK natively): ``import inferlet`` works and every name is
there, and calling into the host says where the call can run."""

from __future__ import annotations

from typing import Any


class Err(Exception):  # (named as the bindings name it)
    """The bindings' error result: ``.value`` holds the error."""

    def __init__(self, value: Any) -> None:
        super().__init__(value)
        self.value = value


class _Unavailable:
    """An interface of the host: every attribute fails with the reason."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        raise RuntimeError(
            f"inferlet: `{self._name}.{attr}` calls the Loom host, which exists only inside "
            "a built inferlet (loom build APP / loom run APP)"
        )


forward = _Unavailable("forward")
generate = _Unavailable("generate")
grammar = _Unavailable("grammar")
http = _Unavailable("http")
kv = _Unavailable("kv")
log = _Unavailable("log")
messaging = _Unavailable("messaging")
wit_model = _Unavailable("model")
queue = _Unavailable("queue")
runtime = _Unavailable("runtime")
store = _Unavailable("store")
types = _Unavailable("types")
