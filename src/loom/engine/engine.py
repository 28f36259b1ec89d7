"""Engine: one model, its KV pool, the runner, and the built-in request scheduler.

``execute`` runs an arbitrary ``ForwardBatch`` (the inferlet runtime's entry);
``add_request`` / ``step`` run the built-in scheduler (schedule -> execute -> update).
"""

from __future__ import annotations

import itertools
import logging
import operator
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from loom.config import EngineConfig
from loom.engine.batch import ForwardBatch, OutputResult
from loom.engine.cpu_threads import ThreadGovernor
from loom.engine.kv_cache import KVCache
from loom.engine.model_runner import LaunchedStep, ModelRunner, TokenFeed
from loom.engine.output_processor import OutputProcessor
from loom.engine.page_pool import PagePool
from loom.engine.prefix_cache import PrefixCache
from loom.engine.request import Request
from loom.engine.sampling_state import SamplingStates
from loom.engine.scheduler import Scheduler, SchedulerOutput
from loom.errors import RequestError
from loom.models import resolve_model_dir
from loom.models.loader import load_model
from loom.models.tokenizer import Tokenizer
from loom.sampling_params import SamplingParams

Prompt = str | Sequence[int]
log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    num_steps: int = 0
    num_tokens: int = 0  # tokens fed through the model
    num_outputs: int = 0
    busy_s: float = 0.0  # wall time inside passes (padding of ``step_time_ms`` included)
    # (sequences, tokens) of recent batches, newest last.
    recent_batches: deque[tuple[int, int]] = field(default_factory=lambda: deque(maxlen=4096))


class Engine:
    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        model_dir = resolve_model_dir(config.model)
        self.tokenizer = Tokenizer.from_dir(model_dir)
        model = load_model(model_dir, config.dtype, config.device)
        model.optimize_for_inference()
        self.model_config = cfg = model.config
        self.max_model_len = min(
            config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings
        )
        num_pages = config.num_pages
        if num_pages is None:
            dtype = next(model.parameters()).dtype
            bytes_per_page = KVCache.bytes_per_token(cfg, dtype) * config.page_size
            num_pages = max(1, config.kv_cache_memory_mb * 2**20 // bytes_per_page)
        graphs = config.cuda_graphs and next(model.parameters()).device.type == "cuda"
        self.runner = ModelRunner(
            model, num_pages, config.page_size, native_attention=config.cpu_attention_kernel,
            decode_graphs=graphs,
        )  # fmt: skip
        if graphs:
            try:
                self.runner.start_decode_graphs(config.cuda_graph_max_batch, self.max_model_len)
            except Exception as e:  # a kernel this GPU cannot build: slower, still correct
                log.warning("CUDA graphs are off, decode runs eagerly: capture failed (%s: %s)",
                            type(e).__name__, e)  # fmt: skip
                self.runner.graphs = None
        self.states = SamplingStates(self.tokenizer, cfg.vocab_size)
        self.runner.states = self.states
        self.pool = PagePool(num_pages, config.page_size)
        self.stats = EngineStats()
        self._step_s = config.step_time_ms / 1000.0
        self.threads: ThreadGovernor | None = None
        if config.adapt_threads and self.runner.device.type == "cpu":
            self.threads = ThreadGovernor()
        self._ids = itertools.count()
        # Schedule and launch the next step before reading this one back (``step``): on a
        # GPU, where a launch returns at once, the host work then overlaps the passes.
        self.lookahead = self.runner.device.type == "cuda"
        self._in_flight: tuple[SchedulerOutput, LaunchedStep] | None = None

    @cached_property
    def prefix_cache(self) -> PrefixCache | None:
        """The built-in scheduler's prefix cache over ``pool`` (None when disabled)."""
        return PrefixCache(self.pool) if self.config.enable_prefix_caching else None

    @cached_property
    def scheduler(self) -> Scheduler:
        """The built-in scheduler (the offline API), made on first use: an engine that
        only executes batches for the runtime's worker never builds it."""
        eos = tuple(dict.fromkeys(self.tokenizer.eos_token_ids + self.model_config.eos_token_ids))
        processor = OutputProcessor(self.tokenizer, eos, self.max_model_len)
        return Scheduler(self.config, self.pool, self.prefix_cache, processor)

    # ===== KV slots (the worker's page operations; the runtime decides, this executes) =====

    def reset_pages(self, pages: list[int]) -> None:
        """Forget every slot of ``pages`` (a new owner must never see the old K/V)."""
        self.runner.cache.reset_pages(pages)

    def copy_slots(self, src_page: int, dst_page: int, src_offset: int, dst_offset: int,
                   size: int) -> None:  # fmt: skip
        """Copy ``size`` slots' K/V, positions and liveness between pages."""
        self.runner.cache.copy_slots(src_page, dst_page, src_offset, dst_offset, size)

    def set_live(self, page: int, live: list[bool]) -> None:
        """Hide (False) or show a page's written slots in every later pass."""
        self.runner.cache.set_live(page, live)

    def place_slots(self, slots: list[int], positions: list[int]) -> None:
        """Show slots whose K/V arrived from another engine, at ``positions``."""
        self.runner.cache.place_slots(slots, positions)

    @property
    def kv(self) -> Any:
        """The KV tensor [layers, 2, slots, kv_heads, head_dim] (KV transfer reads and
        writes it directly)."""
        return self.runner.cache.kv

    def on_layer(self, hook: Callable[[int], None] | None) -> None:
        """Call ``hook(layer)`` after each layer's K/V are written, in every pass until
        unset (None): KV sends go out layer by layer while the next layer computes."""
        self.runner.layer_hook = hook

    # ===== raw forward batches =====

    def execute(self, batch: ForwardBatch) -> list[OutputResult]:
        """Validate and run one batch from any driver; results follow ``batch.outputs``."""
        batch.validate(self.pool.num_pages, self.pool.page_size, self.model_config.vocab_size)
        return self._run(batch)

    def _run(self, batch: ForwardBatch) -> list[OutputResult]:
        return self.launch(batch)()

    def launch(self, batch: ForwardBatch, feed: TokenFeed | None = None) -> LaunchedStep:
        """Start one pass of a batch built from state already checked (not validated
        again); calling the result waits for it and gives the results. On a GPU the host
        is free in between (``ModelRunner.launch``)."""
        t0 = time.perf_counter()
        if self.threads is not None:
            self.threads.poll()
        self.runner.cache.reset_pages(self.pool.drain_fresh())
        pending = self.runner.launch(batch, feed)

        def finish() -> list[OutputResult]:
            results = pending()
            if self._step_s:
                # Constant step time (benchmarks): a pass of any size takes
                # ``step_time_ms``, as a launch-bound GPU decode step does; the CPU is free
                # meanwhile.
                pad = t0 + self._step_s - time.perf_counter()
                if pad > 0:
                    time.sleep(pad)
            self.stats.busy_s += time.perf_counter() - t0
            self.stats.num_steps += 1
            self.stats.num_tokens += batch.num_tokens
            self.stats.num_outputs += len(batch.outputs)
            self.stats.recent_batches.append((batch.num_seqs, batch.num_tokens))
            return results

        return LaunchedStep(pending.tokens, finish)

    # ===== built-in scheduler =====

    def make_request(
        self, prompt: Prompt, params: SamplingParams, request_id: str | None = None
    ) -> Request:
        """Validate a prompt and its parameters into a ``Request`` (nothing is queued)."""
        params.validate()
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("prompt is empty")
            text: str | None = prompt
            ids = self.tokenizer.encode(prompt)
        else:
            try:  # operator.index accepts ints and NumPy integers, rejects floats/strings
                text, ids = None, [operator.index(t) for t in prompt]
            except TypeError:
                raise RequestError("a prompt is a string or a list of integer token ids") from None
            vocab = self.model_config.vocab_size
            if any(not 0 <= t < vocab for t in ids):
                raise RequestError(f"prompt token ids must lie in [0, {vocab})")
        if not ids:
            raise RequestError("prompt is empty")
        if len(ids) >= self.max_model_len:
            raise RequestError(
                f"prompt has {len(ids)} tokens; the context holds {self.max_model_len} "
                "(prompt plus at least one new token)"
            )
        if self.pool.pages_for(len(ids) + 1) > self.pool.num_pages:
            raise RequestError(f"prompt needs more KV pages than the pool has ({len(ids)} tokens)")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        return Request(request_id=rid, prompt_ids=ids, params=params, prompt=text)

    def add_request(
        self, prompt: Prompt, params: SamplingParams, request_id: str | None = None
    ) -> Request:
        req = self.make_request(prompt, params, request_id)
        self.scheduler.add(req)
        return req

    def abort_request(self, request_id: str) -> bool:
        return self.scheduler.abort(request_id) is not None

    def has_unfinished(self) -> bool:
        return self._in_flight is not None or self.scheduler.has_unfinished()

    def step(self) -> list[Request]:
        """Run one scheduled step; return the requests that finished.

        Host work hides behind the passes. Without lookahead (a CPU), a step is launched,
        then the previous step's tokens become text and meet the stop strings, then the
        step's tokens are read back. With lookahead (a GPU), the next step is scheduled and
        launched before this one's tokens are read: its decode rows take those tokens on
        the device (``TokenFeed``), and the host reads, appends and detokenizes while the
        GPU runs. A request ended by a token (EOS, a stop string) then runs one wasted row
        in the step after; a length end is known ahead and costs none."""
        out = self.scheduler.schedule()
        launched = self._launch_scheduled(out) if out is not None else None
        if not self.lookahead:
            self.scheduler.detokenize()
            if out is not None and launched is not None:
                self.scheduler.update(out, launched())
            return self.scheduler.take_finished()
        previous = self._in_flight
        self._in_flight = (out, launched) if out is not None and launched is not None else None
        if previous is not None:
            self.scheduler.update(previous[0], previous[1]())
        self.scheduler.detokenize()
        return self.scheduler.take_finished()

    def _launch_scheduled(self, out: SchedulerOutput) -> LaunchedStep:
        feed = None
        if out.feeds:
            assert self._in_flight is not None and self._in_flight[1].tokens is not None
            rows, sources = zip(*out.feeds, strict=True)
            feed = TokenFeed(list(rows), list(sources), self._in_flight[1].tokens)
        # The scheduler builds batches from validated requests: no per-token re-check.
        return self.launch(out.batch, feed)
