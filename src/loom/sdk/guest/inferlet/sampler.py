"""Samplers: how the host picks the next token from the model's distribution.

Each is a small value the host applies in the batched sampling kernel (no guest work
per token). For a sampler written in Python, ask for the distribution instead
(``await ctx.next_distribution(k)``) and pick from it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sampler:
    """Temperature, then top-k, top-p and min-p filtering; ``seed`` makes it repeatable."""

    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    min_p: float = 0.0  # 0.0: off
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None and not 0 <= self.seed < 1 << 64:
            raise ValueError("seed must fit in 64 bits")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


def Greedy() -> Sampler:
    """Always the most likely token."""
    return Sampler(temperature=0.0)


def Temperature(t: float, seed: int | None = None) -> Sampler:
    return Sampler(temperature=t, seed=seed)


def TopK(k: int, t: float = 1.0, seed: int | None = None) -> Sampler:
    return Sampler(temperature=t, top_k=k, seed=seed)


def TopP(p: float, t: float = 1.0, seed: int | None = None) -> Sampler:
    return Sampler(temperature=t, top_p=p, seed=seed)


def MinP(p: float, t: float = 1.0, seed: int | None = None) -> Sampler:
    return Sampler(temperature=t, min_p=p, seed=seed)
