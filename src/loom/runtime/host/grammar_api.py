"""``grammar``: constraints compiled by the host's grammar engine, and matchers over them.

A guest's matcher lives here, on the runtime thread: ``mask`` gives a decode loop the
tokens allowed next (one host call a step, the mask computed natively), ``accept``
advances it. ``generate`` with a matcher hands the engine worker the grammar and the
tokens the matcher has taken, so the worker masks every step itself; the matcher takes
the generated tokens when the generation ends (``take``).
"""

from __future__ import annotations

import itertools
import json
from typing import TYPE_CHECKING, Any

import torch

from loom.engine.grammar import GrammarError, allowed, fill_bitmask, new_bitmask, new_matcher
from loom.runtime.host.common import iface
from loom.runtime.wasm.ffi import (
    BOOL,
    STRING,
    U32,
    ComponentLinker,
    Err,
    Ok,
    borrow,
    list_of,
    own,
    result,
)

if TYPE_CHECKING:
    import llguidance

    from loom.runtime.services import RuntimeServices

NAME = iface("grammar")


class HostGrammar:
    """The host object behind a guest's ``grammar``: checked llguidance grammar text."""

    def __init__(self, text: str) -> None:
        self.text = text


class HostMatcher:
    """A guest's ``matcher``: the llguidance matcher and every token it has taken."""

    def __init__(self, grammar: str, matcher: llguidance.LLMatcher, taken: list[int]) -> None:
        self.grammar = grammar
        self.matcher = matcher
        self.taken = taken

    def take(self, tokens: list[int]) -> None:
        """Advance past tokens a constrained generation produced (they obey the grammar,
        the last possibly being end-of-sequence)."""
        if not self.matcher.is_stopped():
            self.matcher.consume_tokens(list(tokens))
        self.taken += tokens


def mask_brle(matcher: llguidance.LLMatcher, vocab: int) -> list[int]:
    """The matcher's next-token mask as BRLE runs over ``vocab`` ids (true = forbidden)."""
    bitmask = new_bitmask(1, vocab)
    fill_bitmask(matcher, bitmask, 0)
    # Run-length encode the forbidden bits: runs start where the bit changes; the first
    # run is of allowed (not forbidden) ids.
    forbidden = (~allowed(bitmask, vocab)[0]).to(torch.int8)
    edges = torch.nonzero(forbidden[1:] != forbidden[:-1]).flatten() + 1
    bounds = [0, *edges.tolist(), vocab]
    runs = [b - a for a, b in itertools.pairwise(bounds)]
    return runs if forbidden[0] == 0 else [0, *runs]


def register(linker: ComponentLinker, rt: RuntimeServices) -> None:
    linker.add_resource(NAME, "grammar", lambda key, rep: rt.handles.drop(rep))
    linker.add_resource(NAME, "matcher", lambda key, rep: rt.handles.drop(rep))

    def compile_(key: int, kind: str, source: str) -> Any:
        inst = rt.caller(key)
        arg: Any = source
        if kind in ("json_schema", "choice"):
            try:
                arg = json.loads(source)
            except ValueError as e:
                return Err(f"{kind}: the source is not JSON: {e}")
        try:
            text = rt.grammars.compile(kind, arg)
        except GrammarError as e:
            return Err(str(e))
        return Ok(rt.handles.add(inst.seq, HostGrammar(text)))

    def matcher_of(key: int, rep: int) -> HostMatcher:
        return rt.handles.get(rt.caller(key).seq, rep, HostMatcher)  # type: ignore[no-any-return]

    def new(key: int, g: int) -> int:
        inst = rt.caller(key)
        grammar = rt.handles.get(inst.seq, g, HostGrammar)
        m = new_matcher(rt.grammars.tokenizer, grammar.text)  # (checked when compiled)
        return rt.handles.add(inst.seq, HostMatcher(grammar.text, m, []))

    def mask(key: int, rep: int) -> list[int]:
        return mask_brle(matcher_of(key, rep).matcher, rt.vocab_size)

    def accept(key: int, rep: int, tokens: list[int]) -> bool:
        hm = matcher_of(key, rep)
        if hm.matcher.validate_tokens(tokens) < len(tokens):
            return False
        hm.take(tokens)
        return True

    def fork(key: int, rep: int) -> int:
        hm = matcher_of(key, rep)
        copy = HostMatcher(hm.grammar, hm.matcher.deep_copy(), list(hm.taken))
        return rt.handles.add(rt.caller(key).seq, copy)

    m_t = borrow("matcher")
    linker.add_func(
        NAME, "[static]grammar.compile", [STRING, STRING], result(own("grammar"), STRING), compile_
    )
    linker.add_func(NAME, "[constructor]matcher", [borrow("grammar")], own("matcher"), new)
    linker.add_func(NAME, "[method]matcher.mask", [m_t], list_of(U32), mask)
    linker.add_func(NAME, "[method]matcher.accept", [m_t, list_of(U32)], BOOL, accept)
    linker.add_func(NAME, "[method]matcher.is-accepting", [m_t], BOOL,
                    lambda key, rep: bool(matcher_of(key, rep).matcher.is_accepting()))  # fmt: skip
    linker.add_func(NAME, "[method]matcher.is-stopped", [m_t], BOOL,
                    lambda key, rep: bool(matcher_of(key, rep).matcher.is_stopped()))  # fmt: skip
    linker.add_func(NAME, "[method]matcher.fork", [m_t], own("matcher"), fork)
    linker.add_func(NAME, "[method]matcher.id", [m_t], U32,
                    lambda key, rep: matcher_of(key, rep) and rep)  # fmt: skip
