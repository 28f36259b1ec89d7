"""ForwardBatch -> tensors -> model -> logits -> sampled outputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from loom.engine.attention import PagedAttention, build_metadata
from loom.engine.batch import ForwardBatch, OutputResult
from loom.engine.decode_graphs import DecodeGraphs
from loom.engine.decode_mirror import MIN_MIRROR_CAP_BYTES, DecodeMirror
from loom.engine.device_tensors import to_device
from loom.engine.kv_cache import KVCache
from loom.engine.sampler import draw, read
from loom.engine.sampling_state import SamplingStates
from loom.kernels import cpu as cpu_kernels
from loom.models.transformer import CausalLM


@dataclass(slots=True)
class TokenFeed:
    """Input tokens that live on the device: ``rows`` of a batch take the tokens the
    previous step drew (``tokens[sources]``), so the step can start before they are read
    back. Those rows hold a placeholder in ``ForwardBatch.token_ids``."""

    rows: list[int]
    sources: list[int]
    tokens: torch.Tensor  # [N] long, the previous step's drawn tokens

    def fill(self, ids: torch.Tensor) -> None:
        """Write the fed tokens into ids [T] (on the device)."""
        device = ids.device
        src = self.tokens.index_select(0, to_device(self.sources, device))
        ids.index_copy_(0, to_device(self.rows, device), src)


@dataclass(slots=True)
class LaunchedStep:
    """A step started on the device: ``tokens`` [N] drawn there (None: no outputs);
    calling it waits for the step and gives its results."""

    tokens: torch.Tensor | None
    wait: Callable[[], list[OutputResult]]

    def __call__(self) -> list[OutputResult]:
        return self.wait()


class ModelRunner:
    """Owns the model and its KV tensors; runs one batch per call."""

    def __init__(
        self,
        model: CausalLM,
        num_pages: int,
        page_size: int,
        native_attention: bool = True,
        decode_graphs: bool = False,
    ) -> None:
        """``decode_graphs``: keep a scratch KV slot so ``start_decode_graphs`` can run
        decode steps from fixed buffers (CUDA graphs on a GPU)."""
        self.model = model
        self.config = model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        # The CPU paged-attention kernel where it applies (SDPA otherwise).
        self.native_attention = native_attention and cpu_kernels.attention_supported(
            self.device, self.dtype, self.config.head_dim
        )
        self.cache = KVCache(
            self.config, num_pages, page_size, self.dtype, self.device, scratch_slot=decode_graphs
        )
        self.graphs: DecodeGraphs | None = None
        cfg = self.config
        # The mirror may grow as large as the KV cache (at least MIN_MIRROR_CAP_BYTES).
        kv_bytes = self.cache.kv.numel() * self.cache.kv.element_size()
        self.mirror = DecodeMirror(
            cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, self.dtype, self.device,
            max_bytes=max(MIN_MIRROR_CAP_BYTES, kv_bytes),
        )  # fmt: skip
        # Set by a driver around one step: called per layer after its K/V are written.
        self.layer_hook: Callable[[int], None] | None = None
        # The sampling states rows may name (set by the engine, which has the tokenizer).
        self.states: SamplingStates | None = None

    def start_decode_graphs(
        self, max_batch: int, max_len: int, kernel: bool | None = None, progress: bool = True
    ) -> DecodeGraphs:
        """Run decode steps of up to ``max_batch`` sequences from fixed buffers; on CUDA,
        capture their graphs now. ``kernel``: the Triton attention (default: on CUDA)."""
        self.graphs = DecodeGraphs(self.model, self.cache, max_batch, max_len, kernel)
        if self.device.type == "cuda":
            self.graphs.capture(progress)
        return self.graphs

    def forward_logits(
        self, batch: ForwardBatch, logits_rows: list[int], feed: TokenFeed | None = None
    ) -> torch.Tensor:
        """Run the batch (writing its KV) and return float32 logits [len(logits_rows), V]
        (valid until the next step: a replayed graph reuses its output buffer). ``feed``:
        rows whose tokens come from the previous step's draw on the device."""
        graphs = self.graphs
        if graphs is not None and self.layer_hook is None and graphs.applies(batch):
            self.mirror.reset()  # the mirror's copies miss the keys this step writes
            return graphs.run(batch, logits_rows, feed.fill if feed is not None else None)
        meta = build_metadata(batch, self.cache, self.mirror, self.native_attention)
        ids = to_device(batch.token_ids, self.device)
        if feed is not None:
            feed.fill(ids)
        pos = to_device(batch.positions, self.device)
        rows = to_device(logits_rows, self.device)
        logits: torch.Tensor = self.model(
            ids, pos, PagedAttention(self.cache, meta, self.mirror, self.layer_hook), rows,
            max_position=max(batch.positions),
        )  # fmt: skip
        return logits

    def launch(self, batch: ForwardBatch, feed: TokenFeed | None = None) -> LaunchedStep:
        """Start one engine step; calling the result waits for it and gives the results in
        the order of ``batch.outputs``. On a GPU the step runs meanwhile (the host is free
        until the call); on a CPU it has run by the time this returns."""
        if not batch.outputs:
            self.forward_logits(batch, [], feed)
            return LaunchedStep(None, lambda: [])
        logits = self.forward_logits(batch, [o.index for o in batch.outputs], feed)
        drawn = draw(logits, batch.outputs, self.states)
        return LaunchedStep(drawn.tokens, lambda: read(drawn))

    def execute(self, batch: ForwardBatch) -> list[OutputResult]:
        """One engine step: results in the order of ``batch.outputs``."""
        return self.launch(batch)()
