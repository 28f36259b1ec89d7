import hashlib
from pathlib import Path

import pytest

from loom.models.config import ModelConfig
from loom.models.tiny import ensure_tiny_model, make_tiny_model


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path: Path, tiny_dir: Path) -> None:
    again = make_tiny_model(tmp_path / "again", seed=0)
    other = make_tiny_model(tmp_path / "other", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert digest(again / name) == digest(tiny_dir / name), name
    assert digest(other / "model.safetensors") != digest(tiny_dir / "model.safetensors")
    assert digest(other / "tokenizer.json") == digest(tiny_dir / "tokenizer.json")


def test_loads_in_transformers_without_missing_keys(tiny_dir: Path) -> None:
    from transformers import LlamaForCausalLM

    _, info = LlamaForCausalLM.from_pretrained(tiny_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_overrides_change_shapes(tmp_path: Path) -> None:
    import torch

    path = make_tiny_model(
        tmp_path,
        config_overrides=dict(
            hidden_size=64, num_hidden_layers=2, vocab_size=3000, tie_word_embeddings=False
        ),
        dtype=torch.bfloat16,
    )
    cfg = ModelConfig.from_dir(path)
    assert (cfg.hidden_size, cfg.num_layers, cfg.vocab_size) == (64, 2, 3000)
    assert not cfg.tie_word_embeddings
    with pytest.raises(ValueError, match="too small"):
        make_tiny_model(tmp_path / "x", config_overrides=dict(vocab_size=100))


def test_ensure_tiny_model_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOM_CACHE_DIR", str(tmp_path))
    first = ensure_tiny_model()
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model() == first and first.parent == tmp_path
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temp dirs left
