"""Sampling state a generation carries from step to step, kept where tokens are sampled.

A constrained or penalized generation names its state by id (``OutputSpec.state``); the
sampler applies it to the row — presence/frequency penalties for the tokens generated so
far, then the grammar's mask — and hands the state the token it sampled. Kept in the
engine, the state follows the generation through every path that samples for it (the
runtime's steps, passes run ahead, the worker's chunks) with no round trip per token.

Penalties follow the OpenAI API: ``logit[t] -= presence * (count[t] > 0) + frequency *
count[t]``, counting the generation's output tokens.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from loom.engine.grammar import allowed, fill_bitmask, ll_tokenizer, new_bitmask, new_matcher

if TYPE_CHECKING:
    import llguidance

    from loom.models.tokenizer import Tokenizer

MAX_LIVE_STATES = 4096  # a backstop: ended generations free theirs


@dataclass(frozen=True, slots=True)
class StateSpec:
    """A state to start: ``grammar`` (checked llguidance grammar text) advanced past
    ``prefix`` (tokens it already took), and penalties counting ``outputs`` (output tokens
    so far)."""

    sid: int
    grammar: str | None = None
    prefix: tuple[int, ...] = ()
    presence: float = 0.0
    frequency: float = 0.0
    outputs: tuple[int, ...] = ()


@dataclass(slots=True)
class _State:
    matcher: llguidance.LLMatcher | None
    presence: float
    frequency: float
    counts: dict[int, int] = field(default_factory=dict)


class SamplingStates:
    """Live states by id, applied and advanced by the sampler for the rows naming them."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._tok: llguidance.LLTokenizer | None = None  # built on first grammar
        self._live: OrderedDict[int, _State] = OrderedDict()
        self._eos = tuple(t for t in tokenizer.eos_token_ids if t < vocab_size)

    def __len__(self) -> int:
        return len(self._live)

    def start(self, spec: StateSpec) -> None:
        """Raises ``GrammarError`` for a grammar that does not compile."""
        matcher = None
        if spec.grammar is not None:
            if self._tok is None:
                self._tok = ll_tokenizer(self._tokenizer, self.vocab_size)
            matcher = new_matcher(self._tok, spec.grammar)
            if spec.prefix:
                matcher.consume_tokens(list(spec.prefix))
        state = _State(matcher, spec.presence, spec.frequency)
        for t in spec.outputs if (spec.presence or spec.frequency) else ():
            state.counts[t] = state.counts.get(t, 0) + 1
        self._live[spec.sid] = state
        while len(self._live) > MAX_LIVE_STATES:
            self._live.popitem(last=False)

    def end(self, sid: int) -> None:
        self._live.pop(sid, None)

    def apply(self, logits: torch.Tensor, rows: list[tuple[int, int]]) -> None:
        """Penalize, then mask, ``logits`` [N, V] in place: row i by state ``sid``."""
        masked: list[tuple[int, _State | None]] = []
        for i, sid in rows:
            state = self._live.get(sid)
            if state is None:
                masked.append((i, None))  # a lost state ends its generation
                continue
            if state.counts and (state.presence or state.frequency):
                ids = torch.tensor(list(state.counts), device=logits.device)
                n = torch.tensor(list(state.counts.values()), dtype=logits.dtype,
                                 device=logits.device)  # fmt: skip
                logits[i].index_add_(0, ids, -(state.presence + state.frequency * n))
            if state.matcher is not None:
                masked.append((i, state))
        if masked:
            self._mask(logits, masked)

    def _mask(self, logits: torch.Tensor, rows: list[tuple[int, _State | None]]) -> None:
        vocab = logits.shape[-1]
        bitmask = new_bitmask(len(rows), vocab)
        for j, (_, state) in enumerate(rows):
            m = state.matcher if state is not None else None
            if m is None or m.is_error():
                self._only_eos(bitmask, j)  # a lost or broken matcher ends its generation
            else:
                fill_bitmask(m, bitmask, j)
        ok = allowed(bitmask, vocab, logits.device)  # [R, V]
        for j, (i, _) in enumerate(rows):  # (row views: masked in place, nothing copied)
            logits[i].masked_fill_(~ok[j], float("-inf"))

    def _only_eos(self, bitmask: torch.Tensor, j: int) -> None:
        bitmask[j].zero_()
        for t in self._eos:
            bit = t % 32  # (int32 words: bit 31 is the sign bit)
            bitmask[j, t // 32] |= (1 << bit) if bit < 31 else -(1 << 31)

    def advance(self, sid: int, token: int) -> None:
        state = self._live.get(sid)
        if state is None:
            return
        if state.presence or state.frequency:  # (counts serve the penalties only)
            state.counts[token] = state.counts.get(token, 0) + 1
        if state.matcher is not None and not state.matcher.is_stopped():
            state.matcher.consume_token(token)
