"""Shared test helpers: small random models built from configs (no download)."""

from __future__ import annotations

from typing import Any

import torch

from loom.engine.batch import ForwardBatch, OutputSpec
from loom.models.config import ModelConfig
from loom.models.layers import RotaryEmbedding
from loom.models.transformer import CausalLM


def small_config(**overrides: object) -> ModelConfig:
    base: dict[str, object] = dict(
        architecture="LlamaForCausalLM",
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=512,
    )
    base.update(overrides)
    return ModelConfig(**base)  # type: ignore[arg-type]


def random_model(cfg: ModelConfig | None = None, seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    model = CausalLM(cfg or small_config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    c = model.config
    model.model.rotary = RotaryEmbedding(c.head_dim, c.rope_theta, c.rope_scaling)
    return model.eval()


def single_seq_batch(
    tokens: list[int],
    positions: list[int],
    pages: list[int],
    kv_len: int,
    page_size: int,
    masks: list[list[int]] | None = None,
) -> ForwardBatch:
    """A one-sequence batch whose KV (after this step) is ``kv_len`` slots of ``pages``."""
    n_pages = -(-kv_len // page_size)
    return ForwardBatch(
        token_ids=tokens,
        positions=positions,
        seq_indptr=[0, len(tokens)],
        page_tables=[pages[:n_pages]],
        last_page_lens=[kv_len - (n_pages - 1) * page_size],
        outputs=[OutputSpec(i) for i in range(len(tokens))],
        masks=None if masks is None else [masks],
    )


def assert_all_pages_free(llm: object) -> None:
    """Every page is back in the pool once the prefix cache lets go of its pages."""
    engine = llm.engine  # type: ignore[attr-defined]
    assert not engine.has_unfinished()
    if engine.prefix_cache is not None:
        engine.prefix_cache.clear()
        assert len(engine.prefix_cache) == 0, "a finished request still holds cached pages"
    assert engine.pool.num_free == engine.pool.num_pages


def kv_bytes_per_token(model_dir: Any) -> int:
    """KV bytes one token of a float32 engine on ``model_dir`` holds (all layers, K and V)."""
    import torch

    from loom.engine.kv_cache import KVCache
    from loom.models.config import ModelConfig

    return KVCache.bytes_per_token(ModelConfig.from_dir(model_dir), torch.float32)
