"""The embedded default model: a deterministic tiny Llama in Hugging Face format.

``make_tiny_model`` writes config.json, model.safetensors (random weights from a seeded
generator), a byte-level BPE tokenizer trained here on ``corpus.tiny_corpus()``, its
tokenizer_config.json (special tokens and a chat template) and generation_config.json.
The same arguments give byte-identical files (BPE training in ``tokenizers`` breaks ties
deterministically, whatever its thread count). It produces gibberish but runs every path.

Bigger shapes (for benchmarks) come from ``config_overrides``. The tokenizer is trained to
at most ``MAX_TOKENIZER_VOCAB`` ids, which the small built-in corpus supports; a larger
model vocabulary (e.g. 32000) keeps its extra embedding rows, which no text encodes to, as
real checkpoints with padded vocabularies do. Ids the tokenizer lacks decode to "".
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from loom.models.corpus import tiny_corpus
from loom.paths import cache_root

# Bump whenever the files change, so caches made by older code are not reused.
TINY_VERSION = "v3"
MAX_TOKENIZER_VOCAB = 2048
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
BOS, EOS, PAD = 0, 1, 2  # ids of the first three special tokens
# Below this a byte-level BPE has (almost) no merges: 256 bytes, the special tokens, a few.
MIN_VOCAB = 256 + len(SPECIAL_TOKENS) + 32
# NOTE: larger than the usual 0.02 on purpose: untrained weights that small give a nearly
# flat distribution and greedy decoding repeats one token; 0.1 gives varied output.
INIT_STD = 0.1
# Each role has its own special token; any other role would render as plain text the model
# never saw, so the template rejects it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

TINY_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 2048,
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": BOS,
    "eos_token_id": EOS,
    "pad_token_id": PAD,
    "torch_dtype": "float32",
}


def train_tokenizer(vocab_size: int) -> Tokenizer:
    """Byte-level BPE trained on the built-in corpus; BOS is added by the post-processor."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)]
    )
    return tok


def _weights(cfg: dict[str, Any], seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """HF Llama parameter names and shapes; linears ~ N(0, INIT_STD), norms = 1."""
    g = torch.Generator().manual_seed(seed)
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def normal(*shape: int) -> torch.Tensor:
        # Always drawn in float32, so a bf16 model holds the rounded float32 weights and
        # the global default dtype cannot change what a seed gives.
        return torch.empty(shape, dtype=torch.float32).normal_(0.0, INIT_STD, generator=g).to(dtype)

    out = {"model.embed_tokens.weight": normal(v, h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out[p + "self_attn.q_proj.weight"] = normal(q, h)
        out[p + "self_attn.k_proj.weight"] = normal(kv, h)
        out[p + "self_attn.v_proj.weight"] = normal(kv, h)
        out[p + "self_attn.o_proj.weight"] = normal(h, q)
        out[p + "mlp.gate_proj.weight"] = normal(i, h)
        out[p + "mlp.up_proj.weight"] = normal(i, h)
        out[p + "mlp.down_proj.weight"] = normal(h, i)
        out[p + "input_layernorm.weight"] = torch.ones(h, dtype=dtype)
        out[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=dtype)
    out["model.norm.weight"] = torch.ones(h, dtype=dtype)
    if not cfg["tie_word_embeddings"]:
        out["lm_head.weight"] = normal(v, h)
    return out


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.bfloat16``, ``"bfloat16"`` or ``"torch.bfloat16"`` -> ``torch.bfloat16``."""
    resolved = (
        dtype
        if isinstance(dtype, torch.dtype)
        else getattr(torch, dtype.removeprefix("torch."), None)
    )
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype {dtype!r} is not a torch floating-point dtype")
    return resolved


def build_config(
    config_overrides: dict[str, Any] | None = None,
    vocab_size: int | None = None,
    dtype: torch.dtype | str = torch.float32,
) -> dict[str, Any]:
    """``TINY_CONFIG`` with overrides applied and checked (the config.json ``make_tiny_model``
    writes). ``head_dim`` follows ``hidden_size // num_attention_heads`` unless given."""
    overrides = dict(config_overrides or {})
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    cfg = {**TINY_CONFIG, **overrides}
    cfg["torch_dtype"] = str(_resolve_dtype(dtype)).removeprefix("torch.")
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    if "head_dim" not in overrides:
        if cfg["hidden_size"] % heads:
            raise ValueError(
                f"hidden_size {cfg['hidden_size']} is not a multiple of {heads} heads; "
                "give head_dim explicitly"
            )
        cfg["head_dim"] = cfg["hidden_size"] // heads
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads {heads} is not a multiple of kv heads {kv_heads}")
    if cfg["vocab_size"] < MIN_VOCAB:
        raise ValueError(
            f"vocab_size {cfg['vocab_size']} is too small for a byte-level BPE (min {MIN_VOCAB})"
        )
    return cfg


def make_tiny_model(
    out_dir: str | Path,
    seed: int = 0,
    config_overrides: dict[str, Any] | None = None,
    vocab_size: int | None = None,
    dtype: torch.dtype | str = torch.float32,
) -> Path:
    """Write a complete HF-format Llama directory to ``out_dir`` and return its path.

    ``config_overrides`` replaces ``TINY_CONFIG`` fields (hidden_size, num_hidden_layers,
    intermediate_size, num_attention_heads, num_key_value_heads, head_dim, vocab_size,
    tie_word_embeddings, ...); ``vocab_size`` is a shortcut for that field. Weights are
    stored in ``dtype`` (e.g. ``torch.bfloat16`` or ``"bfloat16"``) and config.json says so.
    Only ``seed`` changes the weights; the tokenizer depends on the vocabulary size alone.
    """
    out = Path(out_dir)
    cfg = build_config(config_overrides, vocab_size, dtype)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(min(cfg["vocab_size"], MAX_TOKENIZER_VOCAB))
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    weights = _weights(cfg, seed, _resolve_dtype(dtype))
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": cfg["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    gen = {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out


def default_tiny_dir(seed: int = 0) -> Path:
    """Cache location of the embedded default: ``$LOOM_CACHE_DIR`` or ``~/.cache/loom``."""
    return cache_root() / f"tiny-{TINY_VERSION}-seed{seed}"


def ensure_tiny_model(seed: int = 0) -> Path:
    """The cached embedded default, made on first use (safe under concurrent callers)."""
    target = default_tiny_dir(seed)
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        make_tiny_model(tmp, seed=seed)
        try:
            os.rename(tmp, target)  # atomic: readers see all files or none
        except OSError:
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
