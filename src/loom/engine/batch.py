"""The forward-batch contract between the engine and everything that drives it.

One engine step runs one ``ForwardBatch``: sequences laid out CSR-style (their new tokens
concatenated, ``seq_indptr`` marking where each starts), each with explicit positions, its
KV page table and the fill of its last page, optional BRLE mask rows, and a list of
``OutputSpec`` naming which token rows to read out and what to compute there. The built-in
request scheduler and the inferlet runtime both speak only this type.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loom.errors import RequestError


@dataclass(frozen=True, slots=True)
class SamplerSpec:
    """How to pick a token from one logits row. ``temperature == 0`` is greedy."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off; must lie in (0, 1]
    min_p: float = 0.0  # 0.0 = off; must lie in [0, 1]
    seed: int | None = None  # same seed + same logits -> same token, whatever the batch

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        """Raise ``RequestError`` naming the first out-of-range field."""
        if not self.temperature >= 0.0:  # also rejects NaN
            raise RequestError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise RequestError(f"min_p must be in [0, 1], got {self.min_p}")


@dataclass(frozen=True, slots=True)
class OutputSpec:
    """What to compute at one token row of a batch."""

    index: int  # row in the batch's flattened tokens
    sampler: SamplerSpec | None = None  # None: no sampled token
    top_k_dist: int = 0  # > 0: return the k most likely tokens with their probabilities
    logprobs: int | None = None  # None: none; 0: of the chosen token; k: plus the top-k
    logit_mask: list[int] | None = None  # BRLE over the vocabulary; true = forbidden
    # Added to the logits before sampling (and before the mask): (token ids, values).
    logit_bias: tuple[tuple[int, ...], tuple[float, ...]] | None = None
    # A live state of the engine's ``SamplingStates`` (penalties, a grammar matcher):
    # applied to the row after bias and mask; it takes the sampled token.
    state: int | None = None


@dataclass(slots=True)
class OutputResult:
    token: int | None = None
    logprob: float | None = None  # of ``token`` under the unmodified model distribution
    top_ids: list[int] = field(default_factory=list)  # top-k distribution (descending)
    top_probs: list[float] = field(default_factory=list)
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


@dataclass(slots=True)
class ForwardBatch:
    """One engine step. Tokens of sequence s are rows ``seq_indptr[s]:seq_indptr[s+1]``.

    A sequence's KV is its page table read in order: ``page_size * (pages - 1) +
    last_page_len`` slots, of which the last ``num_new_tokens`` are written by this step.
    ``masks[s]`` (when given) has one BRLE row per new token; row i covers the context plus
    new tokens 0..i, and ``true`` means masked out. Masks AND with causal order by position
    and with slot occupancy.
    """

    token_ids: list[int]
    positions: list[int]
    seq_indptr: list[int]
    page_tables: list[list[int]]
    last_page_lens: list[int]
    outputs: list[OutputSpec] = field(default_factory=list)
    masks: list[list[list[int]] | None] | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.page_tables)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def kv_len(self, seq: int, page_size: int) -> int:
        return page_size * (len(self.page_tables[seq]) - 1) + self.last_page_lens[seq]

    def validate(self, num_pages: int, page_size: int, vocab_size: int) -> None:
        """Check the structure; raise ``ValueError`` describing the first problem found."""
        t = len(self.token_ids)
        if len(self.positions) != t:
            raise ValueError(f"{t} tokens but {len(self.positions)} positions")
        if len(self.seq_indptr) != self.num_seqs + 1 or self.seq_indptr[0] != 0:
            raise ValueError("seq_indptr must start at 0 and have one entry per sequence + 1")
        if self.seq_indptr[-1] != t or len(self.last_page_lens) != self.num_seqs:
            raise ValueError("seq_indptr / last_page_lens do not match the tokens and sequences")
        if any(not 0 <= tok < vocab_size for tok in self.token_ids):
            raise ValueError(f"token id out of range [0, {vocab_size})")
        if any(p < 0 for p in self.positions):
            raise ValueError("positions must be >= 0")
        for s in range(self.num_seqs):
            new = self.seq_indptr[s + 1] - self.seq_indptr[s]
            pages = self.page_tables[s]
            if new < 0:
                raise ValueError(f"sequence {s}: seq_indptr is not non-decreasing")
            if not pages:
                raise ValueError(f"sequence {s}: empty page table")
            if any(not 0 <= p < num_pages for p in pages):
                raise ValueError(f"sequence {s}: page id out of range [0, {num_pages})")
            if not 1 <= self.last_page_lens[s] <= page_size:
                raise ValueError(f"sequence {s}: last_page_len must be in [1, {page_size}]")
            if self.kv_len(s, page_size) < new:
                raise ValueError(f"sequence {s}: {new} new tokens exceed its KV length")
            rows = self.masks[s] if self.masks is not None else None
            if rows is not None:
                if len(rows) != new:
                    raise ValueError(f"sequence {s}: {len(rows)} mask rows for {new} tokens")
                ctx = self.kv_len(s, page_size) - new
                for i, row in enumerate(rows):
                    if sum(row) != ctx + i + 1 or any(r < 0 for r in row):
                        raise ValueError(
                            f"sequence {s}: mask row {i} covers {sum(row)} slots, "
                            f"expected {ctx + i + 1}"
                        )
        for out in self.outputs:
            if not 0 <= out.index < t:
                raise ValueError(f"output index {out.index} out of range [0, {t})")
            if out.sampler is not None:
                out.sampler.validate()
            if out.logit_mask is not None and sum(out.logit_mask) != vocab_size:
                raise ValueError(f"logit mask covers {sum(out.logit_mask)} of {vocab_size} ids")
