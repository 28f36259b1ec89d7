"""The built-in request scheduler: continuous batching under a token budget.

There are no prefill and decode phases. Each request has ``num_computed`` tokens of KV and
needs KV for all its tokens; a step hands out the token budget so every running request
catches up by as much as it can (one token for a decoding request, a chunk of a long
prompt), then admits waiting requests with what is left. A request whose chunk reaches
its last token samples the next one. When pages run out, the newest running request is
preempted: its pages are freed and it is recomputed later (prefix-cache hits make that
cheap when its pages are still cached).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from loom.config import EngineConfig
from loom.engine.batch import ForwardBatch, OutputResult, OutputSpec
from loom.engine.output_processor import OutputProcessor
from loom.engine.page_pool import PagePool
from loom.engine.prefix_cache import ROOT_KEY, PrefixCache, chain_keys
from loom.engine.request import Request, RequestStatus
from loom.errors import OutOfPagesError


@dataclass(slots=True)
class ScheduledSeq:
    request: Request
    num_new: int  # tokens fed this step
    samples: bool  # the chunk ends at the request's last token: sample the next


@dataclass(slots=True)
class SchedulerOutput:
    batch: ForwardBatch
    seqs: list[ScheduledSeq]
    # (token row, output index of the step in flight): rows whose input is a token that
    # step is drawing, not known here yet (a ``PENDING`` placeholder in the batch).
    feeds: list[tuple[int, int]] = field(default_factory=list)


# An output token sampled by a step that has not been read back yet.
PENDING = -1


class Scheduler:
    def __init__(
        self,
        config: EngineConfig,
        pool: PagePool,
        prefix_cache: PrefixCache | None,
        outputs: OutputProcessor,
    ) -> None:
        self.config = config
        self.pool, self.prefix_cache, self.outputs = pool, prefix_cache, outputs
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self._finished: list[Request] = []  # finished since the last take_finished()
        # Requests whose latest tokens are not text yet (``detokenize``), in order.
        self._undetokenized: dict[Request, None] = {}

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self._undetokenized)

    def abort(self, request_id: str) -> Request | None:
        for req in list(self.waiting) + self.running:
            if req.request_id == request_id:
                self._finish(req, "abort")
                return req
        return None

    # ===== schedule =====

    def schedule(self) -> SchedulerOutput | None:
        budget = self.config.max_num_batched_tokens
        seqs: list[ScheduledSeq] = []
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if self._at_limit(req):  # its last token is in flight: it ends when read back
                i += 1
                continue
            n = min(req.num_tokens - req.num_computed, budget)
            if not self._grow(req, n):
                continue  # req was preempted (or finished); running shrank
            seqs.append(ScheduledSeq(req, n, req.num_computed + n == req.num_tokens))
            budget -= n
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if req.num_pending:  # preempted with a token in flight: admitted once it is read
                break
            if not self._admit(req, budget):
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            n = min(req.num_tokens - req.num_computed, budget)
            seqs.append(ScheduledSeq(req, n, req.num_computed + n == req.num_tokens))
            budget -= n
        if not seqs:
            return None
        out = self._build_batch(seqs)
        for s in seqs:  # committed: the step computes these tokens and samples the next
            s.request.num_computed += s.num_new
            if s.samples:
                s.request.output_ids.append(PENDING)
                s.request.num_pending += 1
        return out

    def _at_limit(self, req: Request) -> bool:
        """The request has all its tokens (its last still in flight)."""
        return (
            len(req.output_ids) >= req.params.max_tokens
            or req.num_tokens >= self.outputs.max_model_len
        )

    def _grow(self, req: Request, n: int) -> bool:
        """Give ``req`` pages for ``n`` more tokens, preempting newer requests if needed."""
        need = self.pool.pages_for(req.num_computed + n) - len(req.pages)
        while need > 0 and not self.pool.can_allocate(need):
            victim = self.running[-1]
            if victim is req and len(self.running) == 1:
                # Alone and still short: this request can never fit in the pool.
                self._finish(req, "length")
                return False
            self._preempt(victim)
            if victim is req:
                return False
        if need > 0:
            req.pages += self.pool.allocate(need)
        return True

    def _admit(self, req: Request, budget: int) -> bool:
        """Match the prefix cache and reserve pages for the first chunk; False = not now."""
        ps = self.pool.page_size
        if self.prefix_cache is not None and req.num_computed == 0:
            # Leave at least one token to compute: its logits give the next token.
            req.page_keys = chain_keys(
                req.tokens(0, req.num_tokens), ps, (req.num_tokens - 1) // ps
            )
            req.pages = self.prefix_cache.match(req.page_keys)
            req.num_computed = req.num_cached_tokens = len(req.pages) * ps
            req.num_inserted_pages = len(req.pages)
        n = min(req.num_tokens - req.num_computed, budget)
        need = self.pool.pages_for(req.num_computed + n) - len(req.pages)
        # Keep one page per running request in reserve so admissions do not force
        # immediate preemption of decoding requests.
        if not self.pool.can_allocate(need + len(self.running)):
            self._release(req)
            return False
        try:
            req.pages += self.pool.allocate(need)
        except OutOfPagesError:
            self._release(req)
            return False
        return True

    def _build_batch(self, seqs: list[ScheduledSeq]) -> SchedulerOutput:
        ps = self.pool.page_size
        tokens: list[int] = []
        positions: list[int] = []
        indptr = [0]
        outputs: list[OutputSpec] = []
        feeds: list[tuple[int, int]] = []
        for s in seqs:
            req, start = s.request, s.request.num_computed
            tokens += req.tokens(start, start + s.num_new)
            if tokens[-1] == PENDING:  # a decode row fed by the step in flight
                assert s.num_new == 1, "only a decode row reads a token still in flight"
                feeds.append((len(tokens) - 1, req.sample_index))
            positions += range(start, start + s.num_new)
            indptr.append(len(tokens))
            if s.samples:
                params = req.params
                req.sample_index = len(outputs)
                outputs.append(
                    OutputSpec(
                        index=len(tokens) - 1,
                        sampler=params.sampler_spec(len(req.output_ids)),
                        logprobs=params.logprobs,
                    )
                )
        batch = ForwardBatch(
            token_ids=tokens,
            positions=positions,
            seq_indptr=indptr,
            page_tables=[s.request.pages for s in seqs],
            last_page_lens=[
                s.request.num_computed + s.num_new - (len(s.request.pages) - 1) * ps for s in seqs
            ],
            outputs=outputs,
        )
        return SchedulerOutput(batch, seqs, feeds)

    # ===== update =====

    def take_finished(self) -> list[Request]:
        """Requests finished (by stop, length or abort) since the last call."""
        done, self._finished = self._finished, []
        return done

    def update(self, out: SchedulerOutput, results: list[OutputResult]) -> None:
        """Apply one step's results to its requests: each sampled token takes its
        placeholder. A request ending here (a stop token, its length) leaves the running
        set and frees its pages now; it is finished once ``detokenize`` has made its text."""
        it = iter(results)
        now = time.perf_counter()
        for s in out.seqs:
            req = s.request
            result = next(it) if s.samples else None
            if req.is_finished:  # aborted, or stopped by a stop string, while the step ran
                continue
            reason = None
            if result is not None:
                if req.first_token_at is None:
                    req.first_token_at = now
                req.last_token_at = now
                reason = self.outputs.append(req, result)
                self._undetokenized[req] = None
            if req.status is RequestStatus.RUNNING:  # (not preempted since it was launched)
                self._cache_full_pages(req)
            if reason is not None:
                self._end(req, reason)

    def _end(self, req: Request, reason: str) -> None:
        """Out of the running (or waiting) set, pages freed; finished by ``detokenize``."""
        self._leave(req)
        req.finish_reason = reason
        req.status = RequestStatus.ENDING

    def detokenize(self) -> None:
        """Turn the tokens of the latest ``update`` into text, apply stop strings, and
        finish the requests that ended."""
        pending, self._undetokenized = self._undetokenized, {}
        for req in pending:
            if req.is_finished:  # aborted since
                continue
            reason = self.outputs.detokenize(req)
            if reason is not None:
                self._finish(req, reason)
            elif req.status is RequestStatus.ENDING:
                assert req.finish_reason is not None
                self._finish(req, req.finish_reason)

    def _cache_full_pages(self, req: Request) -> None:
        if self.prefix_cache is None:
            return
        ps = self.pool.page_size
        full = req.num_computed // ps
        if full <= req.num_inserted_pages:
            return
        have = len(req.page_keys)
        if full > have:
            parent = req.page_keys[-1] if have else ROOT_KEY
            req.page_keys += chain_keys(req.tokens(have * ps, full * ps), ps, full - have, parent)
        first = req.num_inserted_pages
        self.prefix_cache.insert(req.page_keys[first:full], req.pages[first:full], first)
        req.num_inserted_pages = full

    # ===== lifecycle =====

    def _release(self, req: Request) -> None:
        self.pool.free(req.pages)
        req.pages = []
        req.num_computed = req.num_inserted_pages = 0
        req.page_keys = []

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._release(req)
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _leave(self, req: Request) -> None:
        """Out of whichever queue holds it, its pages freed."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self._release(req)

    def _finish(self, req: Request, reason: str) -> None:
        self._leave(req)
        if req.num_pending:  # tokens of steps still in flight are not part of the output
            del req.output_ids[len(req.output_ids) - req.num_pending :]
            req.num_pending = 0
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.detokenizer = None
        self._finished.append(req)
