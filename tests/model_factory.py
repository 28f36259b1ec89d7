"""Random-weight Hugging Face models of every supported family, built from configs.

``transformers`` is the numerical reference; these directories are what Loom loads.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

FAMILIES = ["llama3", "mistral", "qwen2", "qwen3"]

_COMMON: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
)


def hf_config(family: str, vocab_size: int) -> Any:
    import transformers as tf

    # Special ids follow the tiny tokenizer (BOS 0, EOS 1, PAD 2) so both sides stop alike.
    common = {
        **_COMMON,
        "vocab_size": vocab_size,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 2,
    }
    if family == "llama3":
        rope = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        return tf.LlamaConfig(**common, rope_scaling=rope, tie_word_embeddings=True)
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=None, tie_word_embeddings=False)
    if family == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=False)
    if family == "qwen3":
        return tf.Qwen3Config(**common, head_dim=32, tie_word_embeddings=True)
    raise ValueError(family)


def make_hf_model(
    family: str,
    out: Path,
    vocab_size: int = 256,
    tokenizer_from: Path | None = None,
    seed: int = 0,
) -> Any:
    """Save a random HF model of ``family`` to ``out`` and return it (float32, eval)."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = hf_config(family, vocab_size)
    cls = {
        "llama3": tf.LlamaForCausalLM,
        "mistral": tf.MistralForCausalLM,
        "qwen2": tf.Qwen2ForCausalLM,
        "qwen3": tf.Qwen3ForCausalLM,
    }[family]
    model = cls(cfg).eval()
    with torch.no_grad():  # make norms and biases matter
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
            elif p.dim() == 2:
                p.mul_(3.0)  # sharper distributions: fewer near-ties in greedy decoding
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if tokenizer_from is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (tokenizer_from / name).exists():
                shutil.copy(tokenizer_from / name, out / name)
    return model
