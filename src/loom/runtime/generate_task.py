"""The declarative fast path: a whole generation run by the host, one result at the end.

The task sits at the head of its queue and contributes one sequence to every engine batch
(first its pending tokens, then one sampled token per step) until a stop condition holds,
so a Python inferlet pays one guest call per generation instead of several per token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loom.engine.batch import OutputResult, OutputSpec, SamplerSpec
from loom.engine.stopping import find_stop, held_back
from loom.models.detokenizer import IncrementalDetokenizer
from loom.models.tokenizer import Tokenizer
from loom.runtime.futures import HostFuture


@dataclass
class StopConditions:
    max_tokens: int
    stop_tokens: frozenset[int]
    stop_strings: tuple[str, ...]


@dataclass(eq=False)
class GenerateTask:
    pages: list[int]  # virtual ids, grown as the context grows
    kv_len: int  # slots of `pages` already holding KV
    pending: list[int]  # tokens to feed next (not yet in the KV)
    position: int  # position of pending[0]
    sampler: SamplerSpec
    stop: StopConditions
    logit_mask: list[int] | None
    stream: bool
    tokenizer: Tokenizer
    future: HostFuture = field(default_factory=HostFuture)
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of ``text`` handed out by ``on_token``
    finish_reason: str | None = None
    detok: IncrementalDetokenizer | None = None
    # Host-side users (the OpenAI API) ask for logprobs per generated token (None: none,
    # 0: the chosen token's, k: plus the k most likely) and get each step's text and the
    # end through callbacks instead of a guest future.
    logprobs: int | None = None
    outputs: list[OutputResult] = field(default_factory=list)  # per token, with logprobs
    # (new text, token, its output when logprobs were asked for) per token
    on_delta: Callable[[str, int, OutputResult | None], None] | None = None
    on_finish: Callable[[GenerateTask], Any] | None = None
    # A generation from an empty inferlet context: its whole prompt, whose full pages go
    # to the prefix cache once its first pass returns (``context_cache``).
    cache_prompt: list[int] | None = None
    logit_bias: tuple[tuple[int, ...], tuple[float, ...]] | None = None  # every token
    # A grammar constraint (llguidance grammar text) and the tokens its matcher already
    # took (a context continuing under it), and OpenAI's presence/frequency penalties:
    # the runtime starts the engine's sampling state for them, numbered ``state_id``,
    # before the first step and ends it with the generation.
    grammar: str | None = None
    grammar_prefix: list[int] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    state_id: int | None = None

    def __post_init__(self) -> None:
        self.detok = IncrementalDetokenizer(self.tokenizer, self.pending)

    @property
    def needs_state(self) -> bool:
        return self.grammar is not None or bool(self.presence_penalty or self.frequency_penalty)

    def pages_needed(self, page_size: int) -> int:
        """Extra pages the next step needs to hold its new tokens."""
        need = -(-(self.kv_len + len(self.pending)) // page_size)
        return max(0, need - len(self.pages))

    def step_inputs(self, page_size: int) -> tuple[list[int], list[int], int, OutputSpec]:
        """(tokens, positions, last page fill, output) of the next step."""
        n = len(self.pending)
        total = self.kv_len + n
        last = total - page_size * (len(self.pages) - 1)
        positions = list(range(self.position, self.position + n))
        sampler = self.sampler
        if sampler.seed is not None:  # a fresh, reproducible draw per generated token
            sampler = SamplerSpec(
                sampler.temperature, sampler.top_k, sampler.top_p, sampler.min_p,
                (sampler.seed + len(self.tokens)) & 0xFFFFFFFFFFFFFFFF,
            )  # fmt: skip
        out = OutputSpec(
            index=n - 1,
            sampler=sampler,
            logprobs=self.logprobs,
            logit_mask=self.logit_mask,
            logit_bias=self.logit_bias,
            state=self.state_id,
        )
        return list(self.pending), positions, last, out

    def on_token(self, tok: int) -> str:
        """Take one step's sampled token; returns the text it releases for streaming.
        Text that may be the start of a stop string is held back until it is not (or
        the generation ends), so the streamed pieces always add up to ``text``."""
        assert self.detok is not None
        n = len(self.pending)
        self.kv_len += n
        self.position += n
        self.tokens.append(tok)
        self.pending = [tok]
        if tok in self.stop.stop_tokens:
            self.finish_reason = "stop"
            return self._release()
        delta = self.detok.push(tok)
        before = len(self.text)
        self.text += delta
        cut = find_stop(self.text, before, self.stop.stop_strings) if delta else -1
        if cut >= 0:
            self.text = self.text[:cut]
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.stop.max_tokens:
            self.finish_reason = "length"
            # An incomplete character at the very end, as the engine keeps it.
            self.text += self.detok.flush()
        return self._release()

    def _release(self) -> str:
        held = 0 if self.finish_reason is not None else held_back(self.text, self.stop.stop_strings)
        end = len(self.text) - held
        if end <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent : end], end
        return piece

    def last_page_len(self, page_size: int) -> int:
        if not self.pages:
            return 0
        return self.kv_len - page_size * (len(self.pages) - 1)
