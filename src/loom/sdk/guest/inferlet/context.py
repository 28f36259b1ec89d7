"""``Context``: a token sequence with its KV cache, and the ways to extend it.

Tokens are *filled* first (pending: known but not yet in the KV cache) and enter the KV
cache with the next forward pass: ``flush()`` alone, or the pass that also samples
(``decode_step``, ``generate``). The last sampled token stays pending, as in any decode
loop: the next pass writes it and predicts the one after.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from inferlet import _kv
from inferlet._loop import alone, gather, wait_for
from inferlet._wit import Err, forward, generate, kv, store, types, unwrap
from inferlet.grammar import Constraint, Matcher
from inferlet.model import Model
from inferlet.sampler import Greedy, Sampler
from inferlet.stop import Stop, as_stop


@dataclass
class Completion:
    """What ``Context.complete`` generated."""

    tokens: list[int]
    text: str
    finish_reason: str  # "stop", "length" (or "error: ...")
    logprobs: list[float]  # per token, when asked for (else empty)


class Drafter(Protocol):
    """Proposes tokens for ``generate_speculative`` to verify."""

    def draft(self, tokens: list[int]) -> list[int] | list[tuple[int, int]]:
        """Guesses for what follows ``tokens``: a chain of tokens, or a tree of
        ``(token, parent index)`` nodes (parent -1: the root); may be empty."""
        ...

    def feedback(self, accepted: int, proposed: int) -> None:
        """How many of the last proposal the model agreed with."""
        ...

    # Optional: ``observe(preds)`` receives the model's greedy token after the pending
    # tokens and after each draft node of the last pass (``preds[1 + i]``: after node i).


def _export_key(name: str) -> str:
    return f"loom.context/{name}"


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


class Context:
    def __init__(
        self,
        model: Model,
        queue: Any,
        *,
        pages: list[int] | None = None,
        kv_len: int = 0,
        tokens: list[int] | None = None,
        after: list[Any] | None = None,
    ) -> None:
        self.model = model
        self.queue = queue
        self.page_size = model.page_size(queue)
        self.pages: list[int] = pages or []  # held in model.refs
        self.tokens: list[int] = tokens or []  # every token: in the KV cache, then pending
        # Position (index in ``tokens``) of each written KV slot, in slot order. Equal to
        # range(kv_len) until masked pages are dropped.
        self.slot_pos: list[int] = list(range(kv_len))
        self.written = kv_len  # tokens[:written] went through a forward pass
        self.masked: set[int] = set()  # positions hidden from later passes
        self._restricted: set[int] = set()  # positions written under a custom mask
        # Passes of other queues this context's next pass must follow (a fork's parent).
        self._after: list[Any] = after or []
        self._unchecked: list[Any] = []  # flushes not yet seen to succeed
        self._released = False
        # The sampler of the queue's pass ahead (``step-chain``), if one is outstanding:
        # it writes the last (pending) token at position ``written`` and samples the next.
        self._ahead: Sampler | None = None
        # The grammar every generated token of this context obeys (``constrain``).
        self.matcher: Matcher | None = None

    # ----- filling -----

    @property
    def pending(self) -> list[int]:
        """Tokens filled but not yet in the KV cache."""
        return self.tokens[self.written :]

    @property
    def kv_len(self) -> int:
        """KV slots in use (the written tokens minus dropped pages)."""
        return len(self.slot_pos)

    def __len__(self) -> int:
        return len(self.tokens)

    def fill(self, text: str) -> None:
        self.fill_tokens(self.model.tokenizer.encode(text))

    def fill_tokens(self, ids: list[int]) -> None:
        vocab = self.model.tokenizer.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token ids out of range [0, {vocab}): {bad[:5]}")
        self._check_open()
        self.tokens += ids

    def fill_chat(self, messages: list[Any], add_generation_prompt: bool = True) -> None:
        self.fill(self.model.chat_template(messages, add_generation_prompt))

    # ----- forward passes -----

    def _grow(self, total: int) -> None:
        """Make sure pages hold ``total`` tokens."""
        need = _kv.pages_for(total, self.page_size) - len(self.pages)
        if need > 0:
            new = list(kv.allocate(self.queue, need))
            self.model.refs.hold(new)
            self.pages += new

    def _submit(self, outputs: str, arg: Any = None) -> Any:
        """Queue a pass over the pending tokens with ``outputs`` ("none", "token" with a
        sampler ``arg``, "distribution" of ``arg`` tokens) after the last; its result."""
        pending = self.pending
        wanted = [] if outputs == "none" else [(len(pending) - 1, outputs, arg)]
        fut = self._pass(pending, list(range(self.written, len(self.tokens))), None, wanted)
        self.written = len(self.tokens)
        return fut

    def _pass(
        self,
        inputs: list[int],
        positions: list[int],
        rows: list[list[int]] | None,
        outputs: list[tuple[int, str, Any]],
    ) -> Any:
        """Queue one forward pass writing a slot per input after the current KV; returns
        its forward-result. ``rows``: BRLE attention rows (None: causal)."""
        self._check_open()
        if not self.pending:
            raise ValueError("nothing to process: fill tokens first")
        if max(positions) >= self.model.max_model_len:
            raise ValueError(
                f"position {max(positions)} is past the context length {self.model.max_model_len}"
            )
        slots = self.kv_len + len(inputs)
        self._grow(slots)
        pages = self.pages[: _kv.pages_for(slots, self.page_size)]
        last = _kv.last_page_len(slots, self.page_size)
        if rows is None and (
            not outputs or (len(outputs) == 1 and outputs[0][:2] == (len(inputs) - 1, "token"))
        ):
            # The common pass (a decode step, a flush): one host call instead of five.
            self.slot_pos += positions
            sampler = _wit_sampler(outputs[0][2]) if outputs else None
            return forward.step(self.queue, inputs, positions, pages, last, sampler)
        fp = forward.ForwardPass(self.queue)
        fp.input(inputs, positions)
        fp.kv_pages(pages, last)
        if rows is not None:
            fp.attention_mask(rows)
        for index, kind, arg in outputs:
            if kind == "token":
                fp.output_token(index, _wit_sampler(arg))
            elif kind == "masked":  # ``arg``: (sampler, BRLE logit mask)
                fp.output_token(index, _wit_sampler(arg[0]))
                fp.logit_mask(index, arg[1])
            elif kind == "forced":  # token ``arg`` taken here, its log-probability out
                fp.output_token(index, _wit_sampler(_GREEDY))
                fp.logit_mask(index, _kv.only_token(arg, self.model.tokenizer.vocab_size))
                fp.output_logprobs(index, 0)
            else:
                fp.output_distribution(index, arg)
        self.slot_pos += positions
        return fp.execute()

    async def _follow(self) -> None:
        if self._after:
            after, self._after = self._after, []
            for fut in after:
                unwrap(await wait_for(fut))

    def _check_flushes(self) -> None:
        for fut in self._unchecked:
            unwrap(fut.get())
        self._unchecked.clear()

    def flush(self) -> None:
        """Write the pending tokens into the KV cache (queued; no result to wait for).

        A fork's first pass must follow its parent's, so a fork awaits in ``decode_step``;
        use ``await ctx.decode_step()`` or ``generate`` to go on."""
        if self._after:
            raise RuntimeError("a fresh fork cannot flush before its first awaited step")
        if self.pending:
            self._unchecked.append(self._submit("none"))

    async def write(self) -> None:
        """``flush`` and wait until the pending tokens are in the KV cache; unlike
        ``flush``, also for a fresh fork (it first follows its parent's passes)."""
        await self._follow()
        self._check_open()
        if self.pending:
            unwrap(await wait_for(self._submit("none")))
        self._check_flushes()

    async def decode_step(self, sampler: Sampler | None = None) -> int:
        """One forward pass over the pending tokens; the sampled next token (pending).
        Under ``constrain``, the token obeys the grammar (its mask rides the pass)."""
        if self._after:
            await self._follow()
        if self.matcher is not None:
            return await self._decode_constrained(sampler or _GREEDY, self.matcher)
        if self._ahead is None and not self.pending:
            self._check_open()
            self._repend()
        sampler = sampler or _GREEDY
        # Nothing else to run meanwhile: sleep in the pass's own host call (one call per
        # step instead of four: step, pollable, poll, get), with the next step queued ahead.
        chained = alone() and self.written < len(self.tokens) < self.model.max_model_len
        if self._ahead is not None and (self._ahead != sampler or not chained):
            # The pass ahead sampled with another sampler, other tasks now run beside this
            # one (the pipelined path sleeps in its host calls), or the context is full:
            # settle it; its token is this step's if it ran with this sampler.
            same = self._ahead == sampler
            ahead = self._settle()
            if ahead is not None and same:
                self._wrote_pending()
                self.tokens.append(ahead)
                return ahead
        if chained:
            token = self._decode_chained(sampler)
        elif alone() and len(self.tokens) - self.written == 1:
            token = self._decode_waiting(sampler, self.written)
        else:
            token = int(unwrap(await wait_for(self._submit("token", sampler))).tokens[0])
        if self._unchecked:
            self._check_flushes()
        self.tokens.append(token)
        return token

    async def _decode_constrained(self, sampler: Sampler, matcher: Matcher) -> int:
        self._check_open()
        if not self.pending:
            self._repend()
        out = unwrap(await wait_for(self._submit("masked", (sampler, matcher.mask()))))
        token = int(out.tokens[0])
        matcher.accept([token])
        if self._unchecked:
            self._check_flushes()
        self.tokens.append(token)
        return token

    def constrain(self, constraint: Constraint | Matcher | None) -> Matcher | None:
        """Bind a grammar to this context: every later ``generate`` and ``decode_step``
        obeys it, going on from where the last stopped; forks go on from the same point.
        ``None`` unbinds it. Returns the bound matcher."""
        if self._ahead is not None:
            self._settle()  # (a pass ahead sampled without the grammar: dropped)
        if constraint is None or isinstance(constraint, Matcher):
            self.matcher = constraint
        else:
            self.matcher = Matcher(constraint)
        return self.matcher

    def _decode_chained(self, sampler: Sampler) -> int:
        """The pass of ``_submit("token", sampler)`` over the pending tokens: the sampled
        token. Pipelined through ``step-chain``: the call waits for this step's pass
        (queued by the previous call as the pass ahead, or now) and queues the next
        step's, so the engine runs it while this guest handles the token. Written out
        rather than through ``_pass``: it runs once per token of every Python decode loop,
        where each line costs about a microsecond of interpreter time in the sandbox."""
        if self._released:
            raise RuntimeError("this context was released")
        start, end = self.written, len(self.tokens)  # the pending tokens (one, or a prompt)
        slots = len(self.slot_pos) + end - start  # after this step's pass
        ps = self.page_size
        npages = -(-(slots + 1) // ps)  # after the pass ahead
        if npages > len(self.pages):
            self._grow(slots + 1)
        next_pages = self.pages if npages == len(self.pages) else self.pages[:npages]
        wit = _wit_sampler(sampler)
        try:
            if self._ahead is None:
                token = forward.step_chain(
                    self.queue, self.tokens[start:], list(range(start, end)),
                    self.pages[: -(-slots // ps)], (slots - 1) % ps + 1,
                    wit, next_pages, slots % ps + 1,
                )  # fmt: skip
            else:  # one pending token, its pass queued ahead by the last call
                token = forward.step_chain(
                    self.queue, [], [], [], 0, wit, next_pages, slots % ps + 1
                )
        except Err as e:
            self._ahead = None  # a failed pass takes the pass ahead of it along
            raise RuntimeError(str(e.value)) from None
        self._ahead = sampler
        if end - start == 1:
            self.slot_pos.append(start)
        else:
            self.slot_pos += range(start, end)
        self.written = end
        return int(token)

    def _decode_waiting(self, sampler: Sampler, pos: int) -> int:
        """One pass for the single pending token through ``step-wait``, nothing ahead."""
        if pos >= self.model.max_model_len:
            raise ValueError(
                f"position {pos} is past the context length {self.model.max_model_len}"
            )
        slots = len(self.slot_pos) + 1
        ps = self.page_size
        npages = -(-slots // ps)
        if npages > len(self.pages):
            self._grow(slots)
        pages = self.pages if npages == len(self.pages) else self.pages[:npages]
        self.slot_pos.append(pos)
        self.written = pos + 1
        try:
            return int(forward.step_wait(
                self.queue, [self.tokens[pos]], [pos], pages, (slots - 1) % ps + 1,
                _wit_sampler(sampler),
            ))  # fmt: skip
        except Err as e:
            raise RuntimeError(str(e.value)) from None

    def _settle(self) -> int | None:
        """Settle the pass ahead: dropped if it has not run (None), else the token it
        sampled. Either way the pending token stays pending unless the caller takes the
        token (``_wrote_pending``): a later pass writes its slot again, as it would have
        without a pass ahead (after a mask, say, its KV may differ)."""
        self._ahead = None
        try:
            token = forward.step_settle(self.queue)
        except Err as e:
            raise RuntimeError(str(e.value)) from None
        return None if token is None else int(token)

    def _repend(self) -> None:
        """With no token pending (all written, as after a flush, or in a fork of a
        context whose written tokens fill whole pages), take written tokens back so a
        pass can sample after them: a full last page is given back and its tokens are
        recomputed into a page of this context's own (the page may be shared: with a
        fork's parent, the prefix cache, an export); in a partly filled last page, the
        last slot is written again."""
        if self.pending:
            return
        if not self.written:
            raise ValueError("nothing to continue from: fill tokens first")
        ps = self.page_size
        n = self.kv_len % ps or ps
        span = list(range(self.written - n, self.written))
        if (
            self.slot_pos[-n:] != span
            or self.masked.intersection(span)
            or self._restricted.intersection(span)
        ):
            raise ValueError(
                "nothing to continue from: the last written tokens were dropped or masked "
                "(fill a token first)"
            )
        if n == ps:
            index = self.kv_len // ps - 1
            gone = self.model.refs.release([self.pages[index]])
            if gone:
                kv.free(self.queue, gone)
            del self.pages[index]
        else:
            n = 1
        del self.slot_pos[-n:]
        self.written -= n

    def _wrote_pending(self) -> None:
        """The single pending token is in the KV cache: the pass ahead wrote it."""
        self.slot_pos.append(self.written)
        self.written += 1

    async def next_distribution(self, k: int = 32) -> list[tuple[int, float]]:
        """The top-``k`` next-token distribution after the pending tokens (descending).

        The tokens are written to the KV cache; nothing is appended: pick a token and
        ``fill_tokens([t])`` it."""
        await self._follow()
        self._check_open()
        self._repend()
        out = unwrap(await wait_for(self._submit("distribution", k)))
        self._check_flushes()
        return list(zip(out.dist_ids, out.dist_probs, strict=True))

    async def score(self, continuation: list[int]) -> list[float]:
        """The log-probability of each token of ``continuation`` after this context and
        the tokens before it (teacher forcing), in one pass; the tokens are appended."""
        if not continuation:
            return []
        await self._follow()
        self._check_open()
        self._repend()
        first = len(self.pending) - 1  # the row that predicts continuation[0]
        inputs = self.pending + continuation[:-1]
        positions = list(range(self.written, self.written + len(inputs)))
        wanted = [(first + i, "forced", t) for i, t in enumerate(continuation)]
        fut = self._pass(inputs, positions, None, wanted)
        self.tokens += continuation
        self.written += len(inputs)
        out = unwrap(await wait_for(fut))
        self._check_flushes()
        return [float(x) for x in out.logprobs]

    async def write_masked(
        self,
        tokens: list[int],
        hidden: list[set[int]],
        *,
        distributions: Iterable[int] = (),
        k: int = 32,
    ) -> dict[int, list[tuple[int, float]]]:
        """Append ``tokens`` in one pass, token ``i`` not attending to the positions in
        ``hidden[i]`` (indices into ``tokens`` of this context, earlier than its own): a
        2-D attention mask, as hierarchical or parallel-section prompts need. Pending
        tokens are written first, causally. Returns the top-``k`` next-token distribution
        after each token index (into ``tokens``) in ``distributions``."""
        if len(hidden) != len(tokens) or not tokens:
            raise ValueError("give one hidden set per token, and at least one token")
        await self._follow()
        self._check_open()
        n_p = len(self.pending)
        base = self.written + n_p  # position of tokens[0]
        for i, h in enumerate(hidden):
            if any(not 0 <= p < base + i for p in h):
                raise ValueError(f"token {i} may hide only earlier positions (< {base + i})")
        old = [p in self.masked for p in self.slot_pos]
        rows = [_kv.encode_brle(old + [False] * (j + 1)) for j in range(n_p)]
        for i, h in enumerate(hidden):
            before = [m or p in h for m, p in zip(old, self.slot_pos, strict=True)]
            fresh = [self.written + j in h for j in range(n_p + i + 1)]
            rows.append(_kv.encode_brle(before + fresh))
        dist_at = sorted(set(distributions))
        if any(not 0 <= i < len(tokens) for i in dist_at):
            raise ValueError("distribution indices must index tokens")
        self.tokens += tokens
        inputs = self.tokens[self.written :]
        positions = list(range(self.written, self.written + len(inputs)))
        outputs = [(n_p + i, "distribution", k) for i in dist_at]
        fut = self._pass(inputs, positions, rows, outputs)
        self.written += len(inputs)
        # These slots saw a restricted view: never rewrite them as causal (``_repend``).
        self._restricted.update(positions[n_p:])
        out = unwrap(await wait_for(fut))
        self._check_flushes()
        pairs = list(zip(out.dist_ids, out.dist_probs, strict=True))  # k per index, in order
        return {i: pairs[n * k : (n + 1) * k] for n, i in enumerate(dist_at)}

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

    # ----- search -----

    async def beam_search(
        self,
        beam_size: int,
        max_tokens: int,
        *,
        stop: Stop | None = None,
        allowed: Iterable[int] | None = None,
    ) -> list[tuple[list[int], float]]:
        """The ``beam_size`` best continuations by total log-probability, best first.

        Each step asks every beam for its top-``beam_size`` distribution in one batch
        (``gather``), keeps the best ``beam_size`` extensions, and forks the kept beams
        (shared full pages). ``allowed`` restricts the tokens a beam may take (their
        log-probabilities stay those of the unrestricted model). Returns ``(tokens,
        logprob)`` pairs; ``self`` is unchanged."""
        if beam_size < 1 or max_tokens < 1:
            raise ValueError("beam_size and max_tokens must be >= 1")
        cond = stop or Stop()
        eos = set(cond.token_ids) | (set(self.model.eos_tokens) if cond.at_eos else set())
        ok = None if allowed is None else set(allowed)
        # Restricted: the whole distribution, filtered here (the top-k of the model
        # need not hold any allowed token).
        k = beam_size if ok is None else self.model.tokenizer.vocab_size
        beams: list[tuple[Context, list[int], float]] = [(self.fork(), [], 0.0)]
        done: list[tuple[list[int], float]] = []
        for _ in range(max_tokens):
            dists = await gather(*(c.next_distribution(k) for c, _, _ in beams))
            if ok is not None:
                dists = [[(t, p) for t, p in d if t in ok] for d in dists]
            cands = [
                (score + math.log(max(p, 1e-30)), b, tok)
                for b, ((_, _, score), dist) in enumerate(zip(beams, dists, strict=True))
                for tok, p in dist
            ]
            cands.sort(key=lambda c: -c[0])
            kept: list[tuple[Context, list[int], float]] = []
            for score, b, tok in cands[:beam_size]:
                parent, toks = beams[b][0], beams[b][1]
                if tok in eos:
                    done.append(([*toks, tok], score))
                    continue
                child = parent.fork()
                child.fill_tokens([tok])
                kept.append((child, [*toks, tok], score))
            for c, _, _ in beams:
                c.release()
            beams = kept
            if not beams:
                break
        out = done + [(toks, score) for _, toks, score in beams]
        for c, _, _ in beams:
            c.release()
        out.sort(key=lambda b: -b[1])
        return out[:beam_size]

    async def generate_speculative(self, drafter: Drafter, max_tokens: int) -> list[int]:
        """Greedy generation verified against a drafter's guesses; returns the new tokens.

        A draft is a chain (``list[int]``) or a tree (``list[(token, parent)]``, parent
        -1 for the root, parents listed before children). Each step feeds the pending
        tokens plus every draft node in one pass, each node attending only to its own
        ancestors (an attention mask), and asks for the model's greedy token after each.
        The path of drafts the model agrees with is kept, plus the model's own next
        token, so the output equals plain greedy decoding while a good drafter yields
        several tokens per pass. KV of the accepted nodes stored in draft order is kept;
        the rest is re-fed with the next pass."""
        await self._follow()
        self._check_open()
        self._repend()
        out: list[int] = []
        while len(out) < max_tokens:
            nodes = _kv.draft_tree(drafter.draft(list(self.tokens)))
            base_written, base_slots, n_pending = self.written, self.kv_len, len(self.pending)
            if not n_pending:
                raise ValueError("nothing to continue from: fill tokens first")
            res = unwrap(await wait_for(self._submit_tree(nodes)))
            self._check_flushes()
            preds = [int(t) for t in res.tokens]  # after the last pending token, then per node
            path: list[int] = []  # accepted node indices, root to leaf
            pred, parent = preds[0], -1
            while True:
                child = next((i for i, (tok, par) in enumerate(nodes)
                              if par == parent and tok == pred), None)  # fmt: skip
                if child is None:
                    break
                path.append(child)
                pred, parent = preds[1 + child], child
            new = [nodes[i][0] for i in path] + [pred]
            stored = 0  # accepted nodes whose slots sit right after the pending tokens
            while stored < len(path) and path[stored] == stored:
                stored += 1
            self.slot_pos = self.slot_pos[: base_slots + n_pending + stored]
            self.written = base_written + n_pending + stored
            del self.tokens[base_written + n_pending :]
            self.tokens += new
            out += new
            drafter.feedback(len(path), len(nodes))
            observe = getattr(drafter, "observe", None)
            if observe is not None:  # (Jacobi-style drafters guess from the predictions)
                observe(preds)
        extra = len(out) - max_tokens
        if extra > 0:  # the last step may overshoot: give the surplus back
            del out[max_tokens:]
            keep = len(self.tokens) - extra
            del self.tokens[keep:]
            if self.written > keep - 1:
                cut = self.written - (keep - 1)
                self.slot_pos = self.slot_pos[: len(self.slot_pos) - cut]
                self.written = keep - 1
        return out

    def _submit_tree(self, nodes: list[tuple[int, int]]) -> Any:
        """One pass over the pending tokens and a draft tree, each node attending to its
        ancestors only; greedy outputs after the last pending token and every node."""
        pending = self.pending
        vocab = self.model.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t, _ in nodes):
            raise ValueError("draft token out of range")
        n_p, ctx = len(pending), self.kv_len
        depth: list[int] = []
        for _, par in nodes:
            depth.append(0 if par < 0 else depth[par] + 1)
        base = self.written + n_p  # position of the first draft level
        positions = list(range(self.written, base)) + [base + d for d in depth]
        rows = [[ctx + j + 1] for j in range(n_p)]
        for i in range(len(nodes)):
            keep = {i}
            par = nodes[i][1]
            while par >= 0:
                keep.add(par)
                par = nodes[par][1]
            masked = [k not in keep for k in range(i + 1)]
            rows.append(_kv.encode_brle([False] * (ctx + n_p) + masked))
        greedy = Greedy()
        outputs = [(idx, "token", greedy) for idx in range(n_p - 1, n_p + len(nodes))]
        return self._pass(pending + [t for t, _ in nodes], positions,
                          rows if nodes else None, outputs)  # fmt: skip

    # ----- sharing -----

    def fork(self) -> Context:
        """A child context with the same tokens on a queue of its own.

        Full pages of written KV are shared by reference; the tokens of a partly filled
        last page are re-filled as pending in the child (recomputed with its next pass).
        The child's first pass waits for every pass the parent queued before the fork."""
        self._check_open()
        shared_pages = self.kv_len // self.page_size
        shared = self.pages[:shared_pages]
        self.model.refs.hold(shared)
        child = Context(
            self.model,
            self.model._raw.create_queue(),
            pages=list(shared),
            tokens=list(self.tokens),
            after=list(self._unchecked) + list(self._after),
        )
        child.slot_pos = self.slot_pos[: shared_pages * self.page_size]
        child.written = child.slot_pos[-1] + 1 if child.slot_pos else 0
        child.masked = set(self.masked)
        child._restricted = set(self._restricted)
        child.matcher = self.matcher.fork() if self.matcher is not None else None
        return child

    # ----- KV surgery -----

    def mask_tokens(self, start: int | range, end: int | None = None) -> None:
        """Hide tokens at positions ``start..end`` (or a ``range``) from every later pass
        of this context."""
        if isinstance(start, range):
            span = start
            if span.step != 1:
                raise ValueError("mask_tokens takes a contiguous range")
            start, end = span.start, span.stop
        if end is None:
            raise ValueError("mask_tokens needs an end (or a range)")
        self._mask(start, end, set())

    def drop_tokens(self, start: int, end: int) -> int:
        """Hide tokens at positions ``start..end`` from every later pass and free the
        pages they leave wholly hidden; the number of pages freed. Later passes attend
        over fewer pages (an agent drops its tool documentation this way once it has
        chosen its tools). Wholly hidden pages are let go of without being masked, so a
        page shared with other contexts is not copied just to be dropped."""
        self._check_open()
        ps = self.page_size
        hidden = self.masked | set(range(start, end))
        whole = {
            i for i in range(self.kv_len // ps)
            if all(pos in hidden for pos in self.slot_pos[i * ps : (i + 1) * ps])
        }  # fmt: skip
        self._mask(start, end, whole)
        return self.drop_masked_pages()

    def _mask(self, start: int, end: int, skip: set[int]) -> None:
        """Mark ``start..end`` masked and mask the pages holding them but ``skip``."""
        self._check_open()
        if not 0 <= start <= end <= self.written:
            raise ValueError(f"mask range {start}..{end} is not within the written {self.written}")
        self.masked.update(range(start, end))
        ps = self.page_size
        touched = {i // ps for i, pos in enumerate(self.slot_pos) if start <= pos < end} - skip
        for page in sorted(touched):
            slots = self.slot_pos[page * ps : (page + 1) * ps]
            keep = [pos not in self.masked for pos in slots] + [True] * (ps - len(slots))
            kv.mask(self.queue, self.pages[page], keep)

    def drop_masked_pages(self) -> int:
        """Free full pages whose every token is masked; the number of pages dropped.

        Positions are kept: later tokens still see the right distances (attention sinks,
        sliding windows)."""
        self._check_open()
        ps = self.page_size
        full = self.kv_len // ps
        drop = [
            i for i in range(full)
            if all(pos in self.masked for pos in self.slot_pos[i * ps : (i + 1) * ps])
        ]  # fmt: skip
        if not drop:
            return 0
        gone = self.model.refs.release([self.pages[i] for i in drop])
        if gone:
            kv.free(self.queue, gone)
        keep = [i for i in range(len(self.pages)) if i not in set(drop)]
        self.pages = [self.pages[i] for i in keep]
        dropped = set(drop)
        self.slot_pos = [pos for i, pos in enumerate(self.slot_pos) if i // ps not in dropped]
        return len(drop)

    async def export(self, name: str, persistent: bool = False) -> None:
        """Publish this context's written KV (and its tokens) under ``name``; returns once
        the export is visible to other inferlets. A persistent export outlives this
        inferlet; a plain one ends with it."""
        self._check_open()
        if self.kv_len != self.written or not self.written:
            raise ValueError("only a context with written, undropped KV can be exported")
        held = self.pages[: _kv.pages_for(self.kv_len, self.page_size)]
        store.set(_export_key(name), json.dumps(self.tokens[: self.written]))
        kv.export_pages(self.queue, held, name, persistent)
        if not await wait_for(self.queue.synchronize()):
            raise RuntimeError(f"exporting {name!r} failed: an earlier queued command failed")

    @classmethod
    async def import_(cls, model: Model, name: str) -> Context:
        """A context continuing from pages another inferlet exported as ``name``."""
        raw = store.get(_export_key(name))
        ctx: Context = model.create_context()
        try:
            pages = list(kv.import_pages(ctx.queue, name))
        except Err as e:
            raise ValueError(f"cannot import {name!r}: {e.value}") from None
        if raw is None:
            kv.free(ctx.queue, pages)
            raise ValueError(f"export {name!r} carries no tokens (not made by Context.export)")
        tokens: list[int] = json.loads(raw)
        ps = ctx.page_size
        # The last page is recomputed, not shared: the exporter may still write into it,
        # and the importer needs at least one pending token to go on from.
        full = (len(tokens) - 1) // ps
        if pages[full:]:
            kv.free(ctx.queue, pages[full:])
            pages = pages[:full]
        model.refs.hold(pages)
        ctx.pages = pages
        ctx.tokens = tokens
        ctx.slot_pos = list(range(full * ps))
        ctx.written = full * ps
        return ctx

    def release(self) -> None:
        """Give back this context's pages (shared ones once no other context holds them)."""
        if self._released:
            return
        self._released = True
        # A pass ahead still runs if it reached the engine: the pages are freed behind
        # it on the queue, and nothing waits for it here.
        self._ahead = None
        gone = self.model.refs.release(self.pages)
        if gone:
            kv.free(self.queue, gone)
        self.pages = []

    def _check_open(self) -> None:
        """Every use of the context but a decode step passes here: it finds the pass
        ahead settled (whether it wrote its token's KV decides where the next goes)."""
        if self._released:
            raise RuntimeError("this context was released")
        if self._ahead is not None:
            self._settle()


async def decode_all(contexts: list[Context], sampler: Sampler | None = None) -> list[int]:
    """One decode step of every context, submitted together (one engine batch)."""
    tokens: list[int] = await gather(*(c.decode_step(sampler) for c in contexts))
    return tokens
