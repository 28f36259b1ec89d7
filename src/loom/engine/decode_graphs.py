"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A GPU decode step of a small model is launch-bound: ~550 kernels issued one by one from
Python cost ~10x the GPU's own work. A CUDA graph records the whole forward pass once per
bucket (1, 2, 4, ..., 256 sequences) over fixed input buffers; each step then copies the
batch into the buffers (padding rows up to the bucket) and replays the graph, one launch.

Which steps: decode only (one new token per sequence), no BRLE masks, no per-layer hook
(KV transfer), at most the largest bucket, pages and positions within the context length.
Everything else takes the eager path. On a CPU the same buffers run eagerly (there is no
launch cost to save); that is how the path is tested without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tqdm import tqdm

from loom.engine.batch import ForwardBatch
from loom.engine.device_tensors import copy_in, to_device
from loom.engine.kv_cache import KVCache
from loom.engine.static_decode import DecodeInputs, StaticDecodeAttention
from loom.kernels import triton_decode
from loom.models.transformer import CausalLM


def buckets_up_to(max_batch: int) -> list[int]:
    """Powers of two from 1 up to the first one holding ``max_batch``."""
    sizes = [1]
    while sizes[-1] < max_batch:
        sizes.append(sizes[-1] * 2)
    return sizes


class DecodeGraphs:
    """Fixed decode buffers over ``cache`` and, on CUDA, one captured graph per bucket.

    ``kernel``: attend with the Triton kernel (default: on CUDA). ``max_len``: the longest
    context a sequence may have (sets the page-table width and the rotary table).
    """

    def __init__(
        self,
        model: CausalLM,
        cache: KVCache,
        max_batch: int,
        max_len: int,
        kernel: bool | None = None,
    ) -> None:
        if cache.scratch_slot is None:
            raise ValueError("decode graphs need a KV cache with a scratch slot")
        self.model, self.cache = model, cache
        device = cache.kv.device
        self.device = device
        self.buckets = buckets_up_to(max_batch)
        self.max_len = max_len
        self.width = -(-max_len // cache.page_size)  # page-table columns
        self.kernel = device.type == "cuda" if kernel is None else kernel
        top = self.buckets[-1]
        # [4, top]: token ids, positions, slots, key counts (one host-to-device copy a step)
        self._meta = torch.zeros(4, top, dtype=torch.long, device=device)
        self._table = torch.zeros(top, self.width, dtype=torch.int32, device=device)
        self._rows = torch.arange(top, device=device)
        # Grown once to the full context: no step reads a position back to grow it. Held
        # here too: the graphs read this tensor's memory even if an eager step (positions
        # past max_len) later grows the model's table into a new one.
        rotary = model.model.rotary
        rotary.cos_sin(self._meta[1, :1], torch.float32, max_len - 1)
        self._rotary_table = rotary.table
        processors = (
            torch.cuda.get_device_properties(device).multi_processor_count
            if device.type == "cuda"
            else 1
        )
        kv_heads = model.config.num_kv_heads
        self._splits = {b: triton_decode.splits_for(b, kv_heads, processors) for b in self.buckets}
        self._graphs: dict[int, Any] = {}  # bucket -> torch.cuda.CUDAGraph
        self._logits: dict[int, torch.Tensor] = {}  # bucket -> graph output [bucket, V]
        self.num_replays = self.num_eager = 0  # steps run, for tests and metrics

    @property
    def captured(self) -> list[int]:
        return sorted(self._graphs)

    def applies(self, batch: ForwardBatch) -> bool:
        """True when this step can run from the fixed buffers."""
        n = batch.num_seqs
        return (
            0 < n <= self.buckets[-1]
            and batch.num_tokens == n
            and (batch.masks is None or all(m is None for m in batch.masks))
            and max(len(p) for p in batch.page_tables) <= self.width
            and max(batch.positions) < self.max_len
        )

    def _inputs(self, bucket: int, width: int) -> DecodeInputs:
        m = self._meta
        return DecodeInputs(m[2, :bucket], self._table[:bucket, :width], m[3, :bucket],
                            m[1, :bucket])  # fmt: skip

    def _forward(self, bucket: int, width: int) -> torch.Tensor:
        attn = StaticDecodeAttention(
            self.cache, self._inputs(bucket, width), self.kernel, self._splits[bucket]
        )
        attn.write_positions()
        logits: torch.Tensor = self.model(
            self._meta[0, :bucket], self._meta[1, :bucket], attn, self._rows[:bucket],
            max_position=self.max_len - 1,
        )  # fmt: skip
        return logits

    def capture(self, progress: bool = True) -> None:
        """Record one graph per bucket, largest first, sharing one memory pool (CUDA)."""
        if self.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        self._fill_padding(self.buckets[-1])
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up: compiles kernels, sets up cuBLAS
            for bucket in self.buckets:
                self._forward(bucket, self.width)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        bar = tqdm(reversed(self.buckets), total=len(self.buckets), disable=not progress,
                   desc="capturing decode graphs", unit="graph")  # fmt: skip
        for bucket in bar:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._logits[bucket] = self._forward(bucket, self.width)
            self._graphs[bucket] = graph
        torch.cuda.synchronize(self.device)

    def _fill_padding(self, bucket: int) -> None:
        """Every row a padding row: it writes the scratch slot and reads no keys."""
        assert self.cache.scratch_slot is not None
        self._meta[:, :bucket] = 0
        self._meta[2, :bucket] = self.cache.scratch_slot

    def run(
        self,
        batch: ForwardBatch,
        logits_rows: list[int],
        fill_ids: Callable[[torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Run a decode batch (``applies`` holds); float32 logits [len(logits_rows), V].
        ``fill_ids`` writes device-side tokens into the token-id buffer [n] first."""
        n = batch.num_seqs
        bucket = next(b for b in self.buckets if b >= n)
        ps = self.cache.page_size
        pad = bucket - n
        scratch = self.cache.scratch_slot
        assert scratch is not None
        # The new token is its sequence's last key: slot of the last page's last entry.
        tables, fills = batch.page_tables, batch.last_page_lens
        slots = [pt[-1] * ps + fill - 1 for pt, fill in zip(tables, fills, strict=True)]
        kv_lens = [ps * (len(pt) - 1) + fill for pt, fill in zip(tables, fills, strict=True)]
        host = torch.tensor(
            [batch.token_ids + [0] * pad, batch.positions + [0] * pad,
             slots + [scratch] * pad, kv_lens + [0] * pad],
            dtype=torch.long,
        )  # fmt: skip
        copy_in(self._meta[:, :bucket], host)
        if fill_ids is not None:
            fill_ids(self._meta[0, :n])
        width = max(len(pt) for pt in batch.page_tables)
        table = torch.tensor([pt + [0] * (width - len(pt)) for pt in batch.page_tables],
                             dtype=torch.int32)  # fmt: skip
        copy_in(self._table[:n, :width], table)
        graph = self._graphs.get(bucket)
        if graph is not None:
            graph.replay()
            logits = self._logits[bucket]
            self.num_replays += 1
        else:
            # Eager over the same buffers (the CPU; a bucket not captured). Only the columns
            # this batch uses are read: the fallback gathers every column it is given.
            logits = self._forward(bucket, width)
            self.num_eager += 1
        if logits_rows == list(range(n)):
            return logits[:n]
        return logits.index_select(0, to_device(logits_rows, self.device))
