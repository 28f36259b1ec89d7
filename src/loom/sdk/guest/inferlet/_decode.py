"""The decode steps of ``Context``: one forward pass per sampled token, driven from the
guest (``decode_step``), pipelined through a pass queued ahead of it (``step-chain``)
while nothing else runs; and the grammar a context's tokens obey (``constrain``)."""

from __future__ import annotations

from inferlet._context_base import _GREEDY, _ContextBase, _wit_sampler
from inferlet._loop import alone, wait_for
from inferlet._wit import Err, forward, kv, unwrap
from inferlet.grammar import Constraint, Matcher
from inferlet.sampler import Sampler


class _DecodeMixin(_ContextBase):
    """``decode_step`` and ``constrain`` of ``Context``, with the pass ahead (``_ahead``)
    and the taking back of written tokens a pass samples after (``_repend``)."""

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
