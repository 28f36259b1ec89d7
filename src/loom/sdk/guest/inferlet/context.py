"""``Context``: a token sequence with its KV cache, and the ways to extend it.

Tokens are *filled* first (pending: known but not yet in the KV cache) and enter the KV
cache with the next forward pass: ``flush()`` alone, or the pass that also samples
(``decode_step``, ``generate``). The last sampled token stays pending, as in any decode
loop: the next pass writes it and predicts the one after.

This module holds the core of ``Context`` (its state, filling, the forward passes,
forks, export and import); its other methods come from the mixins of ``_decode``,
``_generate``, ``_search`` and ``_masking`` (their shared declarations:
``_context_base``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

from inferlet import _kv
from inferlet._context_base import _GREEDY, _wit_sampler
from inferlet._decode import _DecodeMixin
from inferlet._generate import _GenerateMixin
from inferlet._loop import gather, wait_for
from inferlet._masking import _MaskingMixin
from inferlet._search import _SearchMixin
from inferlet._wit import Err, forward, kv, store, unwrap
from inferlet.grammar import Matcher
from inferlet.model import Model
from inferlet.sampler import Sampler


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


class Context(_DecodeMixin, _GenerateMixin, _SearchMixin, _MaskingMixin):
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

    async def export(self, name: str, persistent: bool = False, public: bool = False) -> None:
        """Publish this context's written KV (and its tokens) under ``name``; returns once
        the export is visible to other inferlets. A persistent export outlives this
        inferlet; a plain one ends with it. Only instances of this program may import it,
        unless ``public`` (then any inferlet may)."""
        self._check_open()
        if self.kv_len != self.written or not self.written:
            raise ValueError("only a context with written, undropped KV can be exported")
        held = self.pages[: _kv.pages_for(self.kv_len, self.page_size)]
        store.set(_export_key(name), json.dumps(self.tokens[: self.written]))
        kv.export_pages(self.queue, held, name, persistent)
        if public:
            kv.publish_export(self.queue, name)
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
