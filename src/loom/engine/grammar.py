"""Grammar-constrained sampling with llguidance: constraints compiled once, masks per pass.

A *constraint* (JSON schema, any JSON object, regex, Lark grammar, a choice among strings)
becomes llguidance's grammar text with ``grammar_text``; ``check_grammar`` compiles it
against the model's tokenizer under resource limits and raises ``GrammarError`` naming
the problem. The engine's ``SamplingStates`` holds live matchers: the sampler masks each row
naming one with the tokens its grammar allows next and advances the matcher by the token
it sampled, so a constrained generation needs no round trip per token. Once the grammar
is complete only end-of-sequence is allowed.

llguidance was measured against xgrammar here (``benchmarks/grammar_engines.py``): masks
of ~10 µs (llguidance) and ~2 µs (xgrammar) a token, both far below a pass; llguidance
compiles a realistic schema in 0.5 ms (xgrammar 1.7 ms), takes Lark grammars, and
installs as one 8 MB wheel with no dependencies (xgrammar needs triton and tvm-ffi).
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    import llguidance

    from loom.models.tokenizer import Tokenizer

KINDS = ("json_schema", "json_object", "regex", "lark", "choice")
# A larger constraint is refused before it is compiled (a 64 KiB Lark grammar of 6,000
# alternatives compiles in ~0.1 s here; tool schemas are a few KiB).
MAX_SOURCE_BYTES = 64 * 1024
# JSON without optional whitespace: random or weak models otherwise pad it without end.
_JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarError(ValueError):
    """A constraint that does not compile; the message says what is wrong."""


def _limits() -> llguidance.LLParserLimits:
    import llguidance

    # Bounds on the work one compile or one mask step may do (the defaults allow ~100 ms
    # compiles; these keep a hostile schema to tens of milliseconds of CPU).
    return llguidance.LLParserLimits(
        initial_lexer_fuel=500_000, step_lexer_fuel=200_000, max_grammar_size=200_000
    )


def grammar_text(kind: str, source: Any) -> str:
    """llguidance grammar text for a constraint (not yet checked against a tokenizer).

    ``source``: a schema (dict or JSON text) for ``json_schema``; ignored for
    ``json_object``; a pattern for ``regex``; Lark text for ``lark``; a list of strings
    for ``choice``."""
    import llguidance

    if kind not in KINDS:
        raise GrammarError(f"unknown constraint kind {kind!r} (one of {', '.join(KINDS)})")
    if kind == "json_object":
        source = {"type": "object"}
        kind = "json_schema"
    if kind == "choice":
        if not isinstance(source, (list, tuple)) or not source:
            raise GrammarError("a choice needs a non-empty list of strings")
        if not all(isinstance(s, str) and s for s in source):
            raise GrammarError("a choice's options must be non-empty strings")
        source = "(" + "|".join(re.escape(s) for s in source) + ")"
        kind = "regex"
    if kind == "json_schema":
        if isinstance(source, str):
            try:
                source = json.loads(source)
            except json.JSONDecodeError as e:
                raise GrammarError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(source, dict):
            raise GrammarError("a JSON schema must be a JSON object")
        text = json.dumps(source)
        _check_size(text)
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(text, defaults=_JSON_OPTIONS)  # type: ignore[arg-type]
        except (ValueError, TypeError) as e:
            raise GrammarError(f"invalid JSON schema: {e}") from None
    if not isinstance(source, str) or not source:
        raise GrammarError(f"a {kind} constraint needs non-empty text")
    _check_size(source)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(source)
    return llguidance.LLMatcher.grammar_from_lark(source)


def _check_size(text: str) -> None:
    if len(text.encode()) > MAX_SOURCE_BYTES:
        raise GrammarError(
            f"the constraint is {len(text.encode())} bytes; at most {MAX_SOURCE_BYTES} are allowed"
        )


def ll_tokenizer(tokenizer: Tokenizer, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's view of the model's tokenizer (built once; ~20 ms for 32k ids)."""
    import llguidance

    return llguidance.LLTokenizer(
        tokenizer.to_json(), n_vocab=vocab_size, eos_token=list(tokenizer.eos_token_ids)
    )


def new_matcher(tok: llguidance.LLTokenizer, grammar: str) -> llguidance.LLMatcher:
    """A matcher at the grammar's start; ``GrammarError`` if the grammar does not compile
    or exceeds the limits."""
    import llguidance

    m = llguidance.LLMatcher(tok, grammar, log_level=0, limits=_limits())
    if m.is_error():
        raise GrammarError(_clean(m.get_error()))
    return m


def new_bitmask(rows: int, vocab: int) -> torch.Tensor:
    """int32 [rows, ceil(vocab / 32)], every token allowed: bit ``t % 32`` of word
    ``t // 32`` is token t. (``llguidance.torch`` would do this too, but importing it
    imports ``torch._dynamo`` (~1.2 s) and its apply is a ``torch.compile`` kernel.)"""
    return torch.full((rows, (vocab + 31) // 32), -1, dtype=torch.int32)


def fill_bitmask(m: llguidance.LLMatcher, bitmask: torch.Tensor, row: int) -> None:
    """Write the matcher's next-token mask into ``bitmask[row]`` (llguidance writes the
    words in place, without the GIL)."""
    words = bitmask[row]
    m.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)


def allowed(bitmask: torch.Tensor, vocab: int, device: torch.device | None = None) -> torch.Tensor:
    """bool [rows, vocab] on ``device``: the tokens ``bitmask`` [rows, words] (on the
    CPU) allows."""
    if device is not None and device.type != "cpu":
        # On an accelerator: ship the words (V/8 bytes a row) and unpack there.
        words = bitmask.to(device, non_blocking=True)
        shifts = torch.arange(32, dtype=torch.int32, device=device)
        return ((words.unsqueeze(-1) >> shifts) & 1).flatten(1)[:, :vocab].bool()
    # Little-endian int32 words are bytes in token order, each byte's bits low first:
    # NumPy unpacks them in C (~3x faster than shifting in torch).
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, count=vocab, bitorder="little")
    return torch.from_numpy(bits.view(np.bool_))


def check_grammar(tok: llguidance.LLTokenizer, grammar: str) -> None:
    """Compile ``grammar`` once and compute its first mask (where lexer limits bite)."""
    m = new_matcher(tok, grammar)
    fill_bitmask(m, new_bitmask(1, tok.vocab_size), 0)
    if m.is_error():
        raise GrammarError(_clean(m.get_error()))


def _clean(err: str) -> str:
    return err.strip().splitlines()[0] if err.strip() else "the grammar does not compile"


class GrammarCompiler:
    """Constraints to checked grammar text, for the side that accepts requests (the
    runtime): a bad constraint fails here, with its reason, before it reaches a batch.
    Recent results are kept (agents send the same schema with every request)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, cache_size: int = 128) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._tok: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[str, str] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()  # the API's threads and the runtime's share one

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        if self._tok is None:
            self._tok = ll_tokenizer(self._tokenizer, self.vocab_size)
        return self._tok

    def compile(self, kind: str, source: Any = None) -> str:
        """Checked llguidance grammar text for a constraint; ``GrammarError`` if bad."""
        key = json.dumps([kind, source], sort_keys=True, default=str)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
            text = grammar_text(kind, source)
            check_grammar(self.tokenizer, text)
            self._cache[key] = text
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return text
