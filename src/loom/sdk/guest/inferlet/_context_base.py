"""What the parts of ``Context`` share: the state they all read and write, the methods
they call across modules (declared here for type checkers, each defined in one module),
and the binding records of samplers that forward passes carry.

``Context`` (``inferlet.context``) holds its core and takes its other methods from the
mixins of ``_decode``, ``_generate``, ``_search`` and ``_masking``, each a subclass of
``_ContextBase``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from inferlet._wit import types
from inferlet.grammar import Matcher
from inferlet.model import Model
from inferlet.sampler import Greedy, Sampler

if TYPE_CHECKING:
    from inferlet.context import Context

_WIT_SAMPLERS: dict[Sampler, types.Sampler] = {}
_GREEDY = Greedy()


def _wit_sampler(s: Sampler) -> types.Sampler:
    # Samplers are frozen values and a loop passes the same one every step: build its
    # binding record once (a record costs a few µs of guest time).
    wit = _WIT_SAMPLERS.get(s)
    if wit is None:
        wit = types.Sampler(
            temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p, seed=s.seed
        )
        if len(_WIT_SAMPLERS) < 256:
            _WIT_SAMPLERS[s] = wit
    return wit


class _ContextBase:
    """The attributes of a ``Context`` (set by ``Context.__init__``, where each is
    described) and the methods its parts call on each other: declarations for type
    checkers only, so nothing here exists at run time."""

    model: Model
    queue: Any
    page_size: int
    pages: list[int]
    tokens: list[int]
    slot_pos: list[int]
    written: int
    masked: set[int]
    _restricted: set[int]
    _after: list[Any]
    _unchecked: list[Any]
    _released: bool
    _ahead: Sampler | None
    matcher: Matcher | None

    if TYPE_CHECKING:
        # Defined in ``context`` (the core of ``Context``).
        @property
        def pending(self) -> list[int]: ...
        @property
        def kv_len(self) -> int: ...
        def _grow(self, total: int) -> None: ...
        def _submit(self, outputs: str, arg: Any = None) -> Any: ...
        def _pass(
            self,
            inputs: list[int],
            positions: list[int],
            rows: list[list[int]] | None,
            outputs: list[tuple[int, str, Any]],
        ) -> Any: ...
        async def _follow(self) -> None: ...
        def _check_flushes(self) -> None: ...
        def _check_open(self) -> None: ...
        def fork(self) -> Context: ...

        # Defined in ``_decode``.
        async def decode_step(self, sampler: Sampler | None = None) -> int: ...
        def _settle(self) -> int | None: ...
        def _repend(self) -> None: ...
