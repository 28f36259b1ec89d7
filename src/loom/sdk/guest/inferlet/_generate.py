"""Generation for ``Context``: in the host, one call for the whole text (``generate``,
``complete``), or streamed piece by piece from guest decode steps (``generate_stream``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

from inferlet import _kv
from inferlet._context_base import _GREEDY, _ContextBase, _wit_sampler
from inferlet._loop import wait_for
from inferlet._wit import generate, unwrap
from inferlet.grammar import Constraint, Matcher
from inferlet.sampler import Sampler
from inferlet.stop import Stop, as_stop

if TYPE_CHECKING:
    from inferlet.context import Completion


class _GenerateMixin(_ContextBase):
    """``generate``, ``complete`` and ``generate_stream`` of ``Context``."""

    async def generate(
        self,
        max_tokens: int | None = None,
        sampler: Sampler | None = None,
        stop: Stop | str | list[str] | None = None,
        *,
        allowed: Iterable[int] | None = None,
        bias: dict[int, float] | None = None,
        grammar: Constraint | Matcher | None = None,
    ) -> str:
        """Generate in the host (one call, no guest work per token); the new text.
        ``allowed``: the only token ids it may sample (a logit mask on every token);
        ``bias``: added to those tokens' logits at every step (before sampling);
        ``grammar``: a constraint (``JsonSchema``, ``Regex``, ...) the text obeys, masked
        by the host every step; the generation also ends where the grammar is complete.
        Without one, the context's bound grammar (``constrain``) applies."""
        done = await self.complete(
            max_tokens, sampler, stop, allowed=allowed, bias=bias, grammar=grammar
        )
        return done.text

    async def complete(
        self,
        max_tokens: int | None = None,
        sampler: Sampler | None = None,
        stop: Stop | str | list[str] | None = None,
        *,
        allowed: Iterable[int] | None = None,
        logprobs: bool = False,
        bias: dict[int, float] | None = None,
        grammar: Constraint | Matcher | None = None,
    ) -> Completion:
        """``generate`` with the whole result: the tokens, the text, why it ended and,
        with ``logprobs``, each token's log-probability under the model (without the
        mask or bias)."""
        mask = None
        if allowed is not None:
            ok = set(allowed)
            vocab = self.model.tokenizer.vocab_size
            if not ok or not all(0 <= t < vocab for t in ok):
                raise ValueError(f"allowed token ids must be a non-empty subset of [0, {vocab})")
            mask = _kv.encode_brle([t not in ok for t in range(vocab)])
        pairs = None
        if bias:
            vocab = self.model.tokenizer.vocab_size
            if not all(0 <= t < vocab for t in bias):
                raise ValueError(f"bias token ids must be in [0, {vocab})")
            pairs = [(int(t), float(v)) for t, v in bias.items()]
        if isinstance(grammar, Constraint):
            grammar = Matcher(grammar)  # this generation's own
        matcher = grammar or self.matcher
        tokens, text, reason, lps = await self._generate(
            max_tokens, sampler, stop, mask, logprobs, pairs, matcher
        )  # fmt: skip
        # Defined in ``context``, which imports this module: imported when first needed.
        from inferlet.context import Completion

        return Completion(tokens, text, reason, lps)

    async def _generate(
        self,
        max_tokens: int | None,
        sampler: Sampler | None,
        stop: Any,
        mask: list[int] | None = None,
        logprobs: bool = False,
        bias: list[tuple[int, float]] | None = None,
        matcher: Matcher | None = None,
    ) -> tuple[list[int], str, str, list[float]]:
        await self._follow()
        self._check_open()
        cond = as_stop(stop, max_tokens)
        self._repend()
        held = _kv.pages_for(self.kv_len, self.page_size)
        spare = self.pages[held:]
        limit = cond.max_tokens if cond.max_tokens is not None else self.model.max_model_len
        fut = generate.generate(
            self.queue,
            self.pages[:held],
            _kv.last_page_len(self.kv_len, self.page_size) if self.kv_len else 0,
            self.pending,
            self.written,
            _wit_sampler(sampler or _GREEDY),
            generate.StopConditions(
                max_tokens=limit,
                stop_tokens=list(cond.token_ids),
                stop_strings=list(cond.strings),
                stop_at_eos=cond.at_eos,
            ),
            mask,
            False,
            logprobs,
            bias,
            matcher._raw.id() if matcher is not None else None,
        )
        g = unwrap(await wait_for(fut))
        self._check_flushes()
        new_pages = [p for p in g.pages if p not in set(self.pages)]
        self.model.refs.hold(new_pages)
        self.pages = list(g.pages) + spare
        self.tokens += list(g.tokens)
        # Everything but the last generated token is in the KV cache now.
        self.slot_pos += range(self.written, len(self.tokens) - 1)
        self.written = len(self.tokens) - 1
        return list(g.tokens), g.text, g.finish_reason, list(g.logprobs)

    async def generate_stream(
        self,
        max_tokens: int | None = None,
        sampler: Sampler | None = None,
        stop: Stop | str | list[str] | None = None,
    ) -> AsyncIterator[str]:
        """Text pieces as tokens are produced (one forward call per token)."""
        cond = as_stop(stop, max_tokens)
        text = _kv.IncrementalText(self.model.tokenizer.decode)
        eos = set(cond.token_ids) | (set(self.model.eos_tokens) if cond.at_eos else set())
        produced, count = "", 0
        while True:
            token = await self.decode_step(sampler)
            count += 1
            piece = "" if token in eos else text.push(token)
            grown = produced + piece
            cuts = [grown.find(s) for s in cond.strings if s in grown]
            if cuts:  # a stop string: the text ends before it
                if min(cuts) > len(produced):
                    yield grown[len(produced) : min(cuts)]
                return
            if piece:
                yield piece
            produced = grown
            if token in eos or (cond.max_tokens is not None and count >= cond.max_tokens):
                return
