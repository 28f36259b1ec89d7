"""``SamplingParams``: what a user asks of one generation."""

from __future__ import annotations

from dataclasses import dataclass, field

from loom.engine.batch import SamplerSpec
from loom.errors import RequestError


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16  # new tokens at most
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    top_k: int = 0  # keep the k most likely tokens; 0 = all
    min_p: float = 0.0  # drop tokens below min_p * max prob
    seed: int | None = None  # reproducible sampling for this request
    stop: list[str] = field(default_factory=list)  # stop strings (excluded from the text)
    stop_token_ids: list[int] = field(default_factory=list)  # extra stop tokens
    ignore_eos: bool = False  # keep going past end-of-sequence tokens (benchmarks)
    logprobs: int | None = None  # None: none; 0: chosen token; k: plus top-k per token

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", [self.stop])

    def validate(self) -> None:
        """Raise ``RequestError`` naming the first invalid field."""
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise RequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        self.sampler_spec(0).validate()
        if self.logprobs is not None and self.logprobs < 0:
            raise RequestError(f"logprobs must be >= 0, got {self.logprobs}")
        if any(not s for s in self.stop):
            raise RequestError("stop strings must be non-empty")

    def sampler_spec(self, step: int) -> SamplerSpec:
        """The sampler for output token ``step``; seeded requests get a per-step seed."""
        seed = None if self.seed is None else (self.seed * 1_000_003 + step) & (2**63 - 1)
        return SamplerSpec(self.temperature, self.top_k, self.top_p, self.min_p, seed)
