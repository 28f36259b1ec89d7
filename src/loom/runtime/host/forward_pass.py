"""The forward pass a guest builds: the builder, the checks that let a pass run alone,
and its outputs as the engine and the guest see them (``forward_api`` registers the
resource and queues passes)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loom.engine.batch import OutputResult, OutputSpec, SamplerSpec
from loom.runtime.commands import CommandQueue
from loom.runtime.wasm.ffi import (
    F32,
    U32,
    list_of,
    record,
)

if TYPE_CHECKING:
    from loom.runtime.services import RuntimeServices


FORWARD_OUTPUT = record(
    ("tokens", list_of(U32)),
    ("logprobs", list_of(F32)),
    ("top-logprob-ids", list_of(U32)),
    ("top-logprobs", list_of(F32)),
    ("dist-ids", list_of(U32)),
    ("dist-probs", list_of(F32)),
)


def forward_output(specs: list[OutputSpec], results: list[OutputResult]) -> tuple[list[Any], ...]:
    """The WIT ``forward-output`` of one pass: its results grouped by kind of request."""
    if len(specs) == 1 and specs[0].logprobs is None and not specs[0].top_k_dist:
        # A decode step: at most a sampled token.
        if specs[0].sampler is None:
            return [], [], [], [], [], []
        token = results[0].token
        return [token if token is not None else 0], [], [], [], [], []
    tokens: list[int] = []
    logprobs: list[float] = []
    top_ids: list[int] = []
    top_lps: list[float] = []
    dist_ids: list[int] = []
    dist_probs: list[float] = []
    for spec, r in zip(specs, results, strict=True):
        if spec.sampler is not None:
            tokens.append(r.token if r.token is not None else 0)
        if spec.logprobs is not None:
            logprobs.append(r.logprob if r.logprob is not None else math.nan)
            for tok, lp in r.top_logprobs:
                top_ids.append(tok)
                top_lps.append(lp)
        if spec.top_k_dist:
            dist_ids += r.top_ids
            dist_probs += r.top_probs
    return tokens, logprobs, top_ids, top_lps, dist_ids, dist_probs


@dataclass
class _Out:
    sampler: SamplerSpec | None = None
    top_k_dist: int = 0
    logprobs: int | None = None
    logit_mask: list[int] | None = None


class ForwardPassBuilder:
    """A pass being built by a guest. A plain class: one is made per forward call, and
    a dataclass's default factories cost a few µs each time."""

    __slots__ = ("executed", "last_page_len", "masks", "outputs", "pages", "positions", "queue",
                 "tokens")  # fmt: skip

    def __init__(
        self,
        queue: CommandQueue,
        tokens: list[int] | None = None,
        positions: list[int] | None = None,
        pages: list[int] | None = None,
        last_page_len: int = 0,
        masks: list[list[int]] | None = None,
    ) -> None:
        self.queue = queue
        self.tokens: list[int] = tokens if tokens is not None else []
        self.positions: list[int] = positions if positions is not None else []
        self.pages: list[int] = pages if pages is not None else []
        self.last_page_len = last_page_len
        self.masks = masks
        self.outputs: dict[int, _Out] = {}
        self.executed = False


# Shared specs of outputs without a logit mask (``output_spec``), by row, sampler identity,
# distribution size and logprobs.
_SPECS: dict[tuple[int, int, int, int | None], OutputSpec] = {}


def output_spec(index: int, o: _Out | OutputSpec) -> OutputSpec:
    """The engine's spec of output ``o`` at row ``index`` (of a pass, or of a batch when
    the runtime shifts a pass's specs into it). Specs without a logit mask are shared:
    they are immutable, a decode loop asks for the same one every step, and a frozen
    dataclass costs a few µs to build. Keyed by the sampler's id (hashing a dataclass
    runs Python code): the spec in the entry holds the sampler, so the id stays its own
    while the entry lives."""
    if isinstance(o, OutputSpec) and (o.logit_bias is not None or o.state is not None):
        return dataclasses.replace(o, index=index)  # a generation's step: one of its own
    if o.logit_mask is not None:
        return OutputSpec(index, o.sampler, o.top_k_dist, o.logprobs, o.logit_mask)
    key = (index, id(o.sampler), o.top_k_dist, o.logprobs)
    spec = _SPECS.get(key)
    if spec is None:
        if len(_SPECS) >= 1 << 16:  # rows of the largest batches, per distinct sampler
            _SPECS.clear()
        spec = _SPECS[key] = OutputSpec(index, o.sampler, o.top_k_dist, o.logprobs)
    return spec


def _check(fp: ForwardPassBuilder, outputs: list[OutputSpec], rt: RuntimeServices) -> str | None:
    """Why this pass cannot run, checked alone so it never fails a shared batch.

    The same rules as ``ForwardBatch.validate`` for one sequence, written out straight:
    this runs on every forward call of every inferlet, where building a probe batch cost
    ~10 µs. ``tests/runtime/test_forward_check.py`` holds the two to the same verdicts.
    """
    n = len(fp.tokens)
    if (  # a decode step that passes every rule below (the rules name what fails)
        n == 1
        and fp.masks is None
        and fp.pages
        and len(fp.positions) == 1
        and 0 <= fp.tokens[0] < rt.vocab_size
        and 0 <= fp.positions[0] < rt.max_model_len
        and 1 <= fp.last_page_len <= rt.page_size
        and all(out.index == 0 and out.logit_mask is None for out in outputs)
    ):
        return None
    if not n:
        return "the forward pass has no input tokens"
    if not fp.pages:
        return "the forward pass has no KV pages"
    if len(fp.positions) != n:
        return f"invalid forward pass: {n} tokens but {len(fp.positions)} positions"
    if min(fp.tokens) < 0 or max(fp.tokens) >= rt.vocab_size:
        return f"invalid forward pass: token id out of range [0, {rt.vocab_size})"
    if min(fp.positions) < 0:
        return "invalid forward pass: positions must be >= 0"
    if max(fp.positions) >= rt.max_model_len:
        return f"positions must be < the model's context length {rt.max_model_len}"
    page_size = rt.page_size
    if not 1 <= fp.last_page_len <= page_size:
        return f"invalid forward pass: last_page_len must be in [1, {page_size}]"
    kv_len = page_size * (len(fp.pages) - 1) + fp.last_page_len
    if kv_len < n:
        return f"invalid forward pass: {n} new tokens exceed its KV length"
    if fp.masks is not None:
        if len(fp.masks) != n:
            return f"invalid forward pass: {len(fp.masks)} mask rows for {n} tokens"
        for i, row in enumerate(fp.masks):
            if sum(row) != kv_len - n + i + 1 or (row and min(row) < 0):
                return (
                    f"invalid forward pass: mask row {i} covers {sum(row)} slots, "
                    f"expected {kv_len - n + i + 1}"
                )
    for out in outputs:
        if not 0 <= out.index < n:
            return f"invalid forward pass: output index {out.index} out of range [0, {n})"
        if out.logit_mask is not None and sum(out.logit_mask) != rt.vocab_size:
            return (
                f"invalid forward pass: logit mask covers {sum(out.logit_mask)} of "
                f"{rt.vocab_size} ids"
            )
    return None
