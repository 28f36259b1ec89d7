"""The embedded tiny model: deterministic files that transformers loads as they are."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from loom.models.config import ModelConfig
from loom.models.tiny import (
    BOS,
    EOS,
    PAD,
    SPECIAL_TOKENS,
    TINY_CONFIG,
    default_tiny_dir,
    ensure_tiny_model,
    make_tiny_model,
)
from loom.models.tokenizer import Tokenizer

FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shapes(path: Path) -> dict[str, tuple[list[int], str]]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path: Path, tiny_dir: Path) -> None:
    again = make_tiny_model(tmp_path / "again", seed=0)
    other = make_tiny_model(tmp_path / "other", seed=1)
    for name in FILES:
        assert digest(again / name) == digest(tiny_dir / name), name
    assert digest(other / "model.safetensors") != digest(tiny_dir / "model.safetensors")
    assert digest(other / "tokenizer.json") == digest(tiny_dir / "tokenizer.json")


def test_config_and_special_tokens(tiny_dir: Path) -> None:
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg == {**TINY_CONFIG, "torch_dtype": "float32"}
    tok = Tokenizer.from_dir(tiny_dir)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (BOS, EOS, PAD)
    assert tok.bos_token_id == BOS and tok.eos_token_ids == (EOS,)
    assert tok.vocab_size == cfg["vocab_size"] == 2048
    assert ModelConfig.from_dir(tiny_dir).num_params == sum(
        torch.Size(s).numel() for s, _ in shapes(tiny_dir).values()
    )


def test_weights_have_hf_names_and_init(tiny_dir: Path) -> None:
    got = shapes(tiny_dir)
    assert got["model.layers.3.self_attn.q_proj.weight"] == ([128, 128], "F32")
    assert got["model.layers.0.self_attn.k_proj.weight"] == ([64, 128], "F32")  # 2 kv heads x 32
    assert got["model.layers.0.mlp.down_proj.weight"] == ([128, 384], "F32")  # [out, in]
    assert "lm_head.weight" not in got and len(got) == 1 + 4 * 9 + 1
    with safe_open(str(tiny_dir / "model.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor("model.norm.weight"), torch.ones(128))
        assert 0.05 < f.get_tensor("model.embed_tokens.weight").std().item() < 0.2


def test_loads_in_transformers_without_missing_keys(tiny_dir: Path) -> None:
    from transformers import LlamaForCausalLM

    loaded: Any = LlamaForCausalLM.from_pretrained(tiny_dir, output_loading_info=True)
    model, info = loaded
    assert not any(info.values()), info
    assert model.config.tie_word_embeddings
    ids = Tokenizer.from_dir(tiny_dir).encode("Hello there")
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 2048) and torch.isfinite(logits).all()


def test_overrides_change_shapes(tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    overrides = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    path = make_tiny_model(
        tmp_path / "m", config_overrides=overrides, vocab_size=3000, dtype="bfloat16"
    )
    cfg = ModelConfig.from_dir(path)
    assert (cfg.hidden_size, cfg.num_layers, cfg.vocab_size, cfg.head_dim) == (64, 2, 3000, 8)
    assert not cfg.tie_word_embeddings
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    got = shapes(path)
    assert got["lm_head.weight"] == ([3000, 64], "BF16")
    assert got["model.layers.1.self_attn.v_proj.weight"] == ([16, 64], "BF16")
    # The model vocabulary is padded past the tokenizer's (capped at 2048) ids.
    assert Tokenizer.from_dir(path).vocab_size == 2048
    loaded: Any = LlamaForCausalLM.from_pretrained(path, output_loading_info=True)
    info = loaded[1]
    assert not any(info.values()), info


def test_bad_overrides_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="too small"):
        make_tiny_model(tmp_path / "a", vocab_size=100)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        make_tiny_model(tmp_path / "b", config_overrides=dict(num_key_value_heads=3))
    with pytest.raises(ValueError, match="head_dim"):
        make_tiny_model(tmp_path / "c", config_overrides=dict(hidden_size=130))
    with pytest.raises(ValueError, match="dtype"):
        make_tiny_model(tmp_path / "d", dtype="int8")
    assert not any(tmp_path.iterdir())  # refused before writing anything


def test_ensure_tiny_model_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOM_CACHE_DIR", str(tmp_path))
    first = ensure_tiny_model()
    assert first == default_tiny_dir() and first.parent == tmp_path
    assert first.name.startswith("tiny-") and first.name.endswith("-seed0")
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model() == first
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temp dirs left
    assert sorted(p.name for p in first.iterdir()) == sorted(FILES)
