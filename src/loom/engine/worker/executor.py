"""Running ops against an ``Engine``, in whichever thread or process owns it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from loom.config import EngineConfig
from loom.engine.batch import ForwardBatch, OutputResult, OutputSpec, SamplerSpec
from loom.engine.grammar import GrammarError
from loom.errors import ModelLoadError, RequestError
from loom.models import resolve_model_dir

if TYPE_CHECKING:
    from loom.engine.engine import Engine

from loom.engine.worker.ops import (
    ChunkStep,
    CopySlotsOp,
    EngineStatsSnapshot,
    ExecuteOp,
    GenPlan,
    KVRecvStartOp,
    KVReleaseOp,
    KVReserveOp,
    KVSendCachedOp,
    KVSendSpec,
    KVStatusOp,
    KVTransferResult,
    NudgeOp,
    ResetPagesOp,
    SamplingStateOp,
    SetLiveOp,
    WorkerInfo,
    WorkerOp,
)

logger = logging.getLogger(__name__)

# ===== running ops against an engine (in whichever thread or process owns it) =====


class _OpRunner:
    """Owns the engine; executes one op per call. Used by both workers."""

    def __init__(self, config: EngineConfig) -> None:
        # Resolve first: a bad model directory fails before torch is even imported.
        model_dir = resolve_model_dir(config.model)
        from loom.engine.engine import Engine

        self.engine: Engine = Engine(config)
        engine = self.engine
        self.num_pages, self.page_size = engine.pool.num_pages, engine.pool.page_size
        self.vocab_size = engine.model_config.vocab_size
        self.senders: dict[tuple[Any, ...], Any] = {}  # KV senders by _link_key, made on first use
        # Whether an op waits behind the current one (set by the worker that owns this
        # runner): a generation chunk ends early for it.
        self.pending: Callable[[], bool] = lambda: False
        # Hands each step of a generation chunk to the runtime as it is made (set by the
        # worker that owns this runner), so tokens stream out in the pass that made them.
        self.progress: Callable[[ChunkStep], None] = lambda step: None
        self.receiver: Any = None
        self.last_results: list[OutputResult] | None = None  # of the last ExecuteOp
        # Hand a chunk step's tokens on after launching the next step: on a GPU the send
        # then overlaps the pass. On a CPU the launch runs the pass, which would delay
        # every token by a step, so tokens go out first there.
        self.overlap_progress = engine.runner.device.type == "cuda"
        # The same EOS set the engine's own output processor uses (tokenizer's, then the
        # model config's), keeping order for the runtime's benefit.
        eos = tuple(engine.tokenizer.eos_token_ids) + tuple(engine.model_config.eos_token_ids)
        self.info = WorkerInfo(
            model_dir=str(model_dir),
            num_pages=self.num_pages,
            page_size=self.page_size,
            vocab_size=self.vocab_size,
            max_model_len=engine.max_model_len,
            eos_token_ids=tuple(dict.fromkeys(eos)),
            prefix_caching=config.enable_prefix_caching,
        )

    def _continue(self, results: list[OutputResult], plans: list[GenPlan]) -> list[list[int]]:
        """Decode steps of the planned sequences, batched, until each stops."""
        ps = self.page_size
        last: list[int | None] = [results[p.output].token for p in plans]
        out: list[list[int]] = [[] for _ in plans]
        active = [i for i, p in enumerate(plans) if p.max_steps > 0
                  and last[i] is not None and last[i] not in p.stop_tokens]  # fmt: skip
        unsent: ChunkStep | None = None  # the latest step's tokens, not yet handed on
        while active:
            toks, pos, tables, lasts, outs = [], [], [], [], []
            for j, i in enumerate(active):
                p, k = plans[i], len(out[i])
                written = p.kv_len + k + 1  # slots after this step
                s = p.sampler
                if s.seed is not None:  # the same per-token seed the runtime would use
                    s = SamplerSpec(s.temperature, s.top_k, s.top_p, s.min_p,
                                    (s.seed + p.seed_count + k) & 0xFFFFFFFFFFFFFFFF)  # fmt: skip
                toks.append(int(last[i]))  # type: ignore[arg-type]
                pos.append(p.position + k)
                tables.append(p.pages[: -(-written // ps)])
                lasts.append(written - ps * (len(tables[-1]) - 1))
                outs.append(OutputSpec(j, s, 0, None, p.logit_mask, p.logit_bias, p.state))
            batch = ForwardBatch(toks, pos, list(range(len(active) + 1)), tables, lasts, outs)
            # Built from the plans (their pages checked in ``_execute``, the rest from the
            # op's validated batch): not validated again (~50 µs a step at 32 sequences,
            # on the critical path of every token).
            wait = self.engine.launch(batch)
            if unsent is not None:
                self.progress(unsent)  # the previous step's tokens go out while this one runs
                unsent = None
            step = wait()
            still = []
            made: list[int | None] = [None] * len(plans)
            for j, i in enumerate(active):
                tok = step[j].token
                assert tok is not None
                out[i].append(tok)
                last[i] = tok
                made[i] = tok
                p = plans[i]
                room = (len(p.pages) * ps) - (p.kv_len + len(out[i]) + 1)
                if tok not in p.stop_tokens and len(out[i]) < p.max_steps and room >= 0:
                    still.append(i)
            unsent = ChunkStep(len(out[active[0]]), None, made)
            if not self.overlap_progress:
                self.progress(unsent)
                unsent = None
            active = still
            if active and self.pending():
                break  # new work is waiting: hand back what was made, the runtime goes on
        if unsent is not None:
            self.progress(unsent)
        return out

    def run(self, op: WorkerOp) -> object:
        """Execute one op; raise ``RequestError`` for anything wrong with its arguments."""
        engine = self.engine
        if isinstance(op, ExecuteOp):
            last, self.last_results = self.last_results, None  # a failure leaves None
            if op.chain:
                self._fill_chain(op, last)
            self._check_pages(op.fresh_pages)
            # Reset before validating: the runtime allocated these pages for this batch,
            # and whether or not the batch runs, a previous owner's slots must never be
            # visible through them.
            engine.reset_pages(list(op.fresh_pages))
            try:
                op.batch.validate(self.num_pages, self.page_size, self.vocab_size)
            except ValueError as e:
                # ``validate`` raises plain ValueError for structural problems; at this
                # boundary they are the caller's fault, which is what RequestError says.
                raise _request_error(e, "invalid forward batch") from e
            if op.kv_sends:
                return self._execute_sending(op)
            return self._execute(op)
        if isinstance(op, CopySlotsOp):
            self._check_pages([op.src_page, op.dst_page])
            if op.size < 0:
                raise RequestError(f"copy size must be >= 0, got {op.size}")
            try:
                engine.copy_slots(op.src_page, op.dst_page, op.src_offset, op.dst_offset, op.size)
            except ValueError as e:
                raise _request_error(e, "copy_slots") from e
            return None
        if isinstance(op, SetLiveOp):
            self._check_pages([op.page])
            try:
                engine.set_live(op.page, list(op.live))
            except ValueError as e:
                raise _request_error(e, "set_live") from e
            return None
        if isinstance(op, ResetPagesOp):
            self._check_pages(op.pages)
            engine.reset_pages(list(op.pages))
            return None
        if isinstance(op, NudgeOp):
            return None
        if isinstance(op, SamplingStateOp):
            states = self.engine.states
            for sid in op.end:
                states.end(sid)
            for state in op.start:
                try:
                    states.start(state)
                except GrammarError as e:
                    raise RequestError(f"grammar: {e}") from e
            return None
        if isinstance(op, KVRecvStartOp):
            return self._receiver(op).address
        if isinstance(op, KVReserveOp):
            self._check_pages(op.fresh_pages)
            engine.reset_pages(list(op.fresh_pages))
            self._check_slots(op.slots)
            self._receiver().reserve(op.rid, list(op.slots), list(op.positions))
            return None
        if isinstance(op, KVReleaseOp):
            if self.receiver is not None:
                self.receiver.release(op.rid)
            return None
        if isinstance(op, KVStatusOp):
            return self.receiver.status(op.rid) if self.receiver is not None else None
        if isinstance(op, KVSendCachedOp):
            for spec in op.sends:
                self._check_slots(spec.local_slots)
            for layer in range(engine.kv.shape[0]):
                self._send_layer(op.sends, layer)
            return self._flush_sends(op.sends)
        raise TypeError(f"not a worker op: {type(op).__name__}")

    def _fill_chain(self, op: ExecuteOp, last: list[OutputResult] | None) -> None:
        if last is None:
            raise RequestError("the batch these passes follow failed or did not run")
        tokens = op.batch.token_ids
        for i, j in op.chain:
            if not (0 <= i < len(tokens) and 0 <= j < len(last)):
                raise RequestError(f"chained input {i} <- output {j} is out of range")
            tok = last[j].token
            if tok is None:
                raise RequestError(f"output {j} of the previous batch sampled no token")
            tokens[i] = tok

    def _execute(self, op: ExecuteOp) -> object:
        # ``execute`` validates again (a few microseconds): the engine's only public
        # entry, so its checks stay in one place.
        results = self.engine.execute(op.batch)
        # Generations continued past the step leave its tokens behind: nothing chains on.
        self.last_results = None if op.plans else results
        if not op.plans:
            return results
        for plan in op.plans:
            self._check_pages(plan.pages)
        self.progress(ChunkStep(0, results, None))
        return results, self._continue(results, op.plans)

    def _execute_sending(self, op: ExecuteOp) -> object:
        for spec in op.kv_sends:
            self._check_slots(spec.local_slots)
        self.engine.on_layer(lambda layer: self._send_layer(op.kv_sends, layer))
        try:
            result = self._execute(op)
        finally:
            self.engine.on_layer(None)
        return result, self._flush_sends(op.kv_sends)

    def _send_layer(self, sends: list[KVSendSpec], layer: int) -> None:
        import torch

        kv = self.engine.kv[layer]  # [2, slots, kv_heads, head_dim]
        for spec in sends:
            idx = torch.tensor(spec.local_slots, dtype=torch.long, device=kv.device)
            # A copy: the sender thread writes it out while the next layer computes.
            self._sender(spec).put(spec.dst, spec.rid, spec.remote_slots, layer,
                                   kv.index_select(1, idx))  # fmt: skip

    def _flush_sends(self, sends: list[KVSendSpec]) -> list[KVTransferResult]:
        out = []
        for spec in {_link_key(s): s for s in sends}.values():
            group = {s.rid: s.dst for s in sends if _link_key(s) == _link_key(spec)}
            stats = self._sender(spec).flush(group)
            out += [
                KVTransferResult(rid, st.error is None, st.error, st.bytes, st.send_s, st.exposed_s)
                for rid, st in stats.items()
            ]
        return out

    def _sender(self, spec: KVSendSpec) -> Any:
        from loom.engine.kv_transfer import KVSender

        key = _link_key(spec)
        sender = self.senders.get(key)
        if sender is None:
            sender = self.senders[key] = KVSender(mode=spec.transport, secret=spec.secret,
                                                  progress_s=spec.progress_s)  # fmt: skip
        return sender

    def _receiver(self, op: KVRecvStartOp | None = None) -> Any:
        if self.receiver is None:
            from loom.engine.kv_transfer import KVReceiver

            op = op or KVRecvStartOp()
            self.receiver = KVReceiver(self.engine.kv, self.engine.place_slots, host=op.host,
                                       port=op.port, secret=op.secret,
                                       progress_s=op.progress_s)  # fmt: skip
        return self.receiver

    def _check_slots(self, slots: list[int]) -> None:
        n = self.num_pages * self.page_size
        if any(not (isinstance(s, int) and 0 <= s < n) for s in slots):
            raise RequestError(f"slot ids out of range [0, {n})")

    def _check_pages(self, pages: list[int]) -> None:
        # Out-of-range ids would index past the KV tensors (an IndexError, or a silent
        # no-op for slices), so name them here.
        bad = [p for p in pages if not (isinstance(p, int) and 0 <= p < self.num_pages)]
        if bad:
            raise RequestError(f"page ids out of range [0, {self.num_pages}): {bad[:8]}")

    def stats(self) -> EngineStatsSnapshot:
        s = self.engine.stats
        return EngineStatsSnapshot(
            num_steps=s.num_steps,
            num_tokens=s.num_tokens,
            num_outputs=s.num_outputs,
            recent_batches=list(s.recent_batches),
            busy_s=s.busy_s,
        )


def _request_error(e: ValueError, what: str) -> RequestError:
    return e if isinstance(e, RequestError) else RequestError(f"{what}: {e}")


def _startup_error(e: BaseException) -> ModelLoadError:
    """What ``start_worker`` raises for an engine that failed to load."""
    if isinstance(e, ModelLoadError):
        return e
    err = ModelLoadError(f"engine worker failed to start: {type(e).__name__}: {e}")
    err.__cause__ = e
    return err


def _link_key(spec: KVSendSpec) -> tuple[str, str | None, float]:
    """Sends that may share a ``KVSender`` (and its connections)."""
    return spec.transport, spec.secret, spec.progress_s
