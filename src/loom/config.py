"""Frozen configuration of the engine. CLI flags map one to one onto these fields."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    model: str = "tiny"  # a Hugging Face directory, or "tiny" for the embedded default
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "cpu"  # cpu | cuda | cuda:N
    page_size: int = 16  # tokens per KV page
    num_pages: int | None = None  # KV pages; None = derived from kv_cache_memory_mb
    kv_cache_memory_mb: int = 256  # KV budget when num_pages is None
    max_num_batched_tokens: int = 2048  # token budget of one step (chunked prefill)
    max_num_seqs: int = 256  # sequences running at once
    max_model_len: int | None = None  # context length; None = the model's maximum
    enable_prefix_caching: bool = True
    # Benchmarks only: pad every forward pass to this wall time (0: off), whatever its
    # size, the way a launch-bound GPU step behaves; passes and idle gaps then cost here
    # what they would cost there.
    step_time_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.page_size <= 0 or (self.num_pages is not None and self.num_pages <= 0):
            raise ValueError("page_size and num_pages must be positive")
        if self.max_num_batched_tokens <= 0 or self.max_num_seqs <= 0:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be positive")
        if not 0 <= self.step_time_ms < 60_000:
            raise ValueError(f"step_time_ms must be in [0, 60000), got {self.step_time_ms}")
