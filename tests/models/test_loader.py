"""Loading Hugging Face directories: every family, sharded weights, and clear errors."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loom.errors import ModelLoadError
from loom.models.config import ModelConfig
from loom.models.loader import load_model
from tests.model_factory import FAMILIES, make_hf_model


@pytest.mark.parametrize("family", FAMILIES)
def test_loaded_model_matches_hf_logits(family: str, tmp_path: Path) -> None:
    hf = make_hf_model(family, tmp_path)
    model = load_model(tmp_path)
    ids = torch.arange(3, 40)
    ref = hf(ids[None]).logits[0]
    from loom.engine.model_runner import ModelRunner
    from tests.helpers import single_seq_batch

    runner = ModelRunner(model, num_pages=8, page_size=16)
    got = runner.forward_logits(
        single_seq_batch(ids.tolist(), list(range(37)), list(range(8)), 37, 16), list(range(37))
    )
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_config_flags_per_family(tmp_path: Path) -> None:
    flags = {}
    for fam in FAMILIES:
        make_hf_model(fam, tmp_path / fam)
        c = ModelConfig.from_dir(tmp_path / fam)
        flags[fam] = (c.attention_bias, c.qk_norm, c.rope_scaling is not None)
    assert flags["qwen2"][0] and flags["qwen3"][1] and flags["llama3"][2]
    assert flags["mistral"] == (False, False, False)


def test_sharded_weights_load(tmp_path: Path) -> None:
    make_hf_model("llama3", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    shards = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, tmp_path / fname)
    (tmp_path / "model.safetensors").unlink()
    index = {"weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    model = load_model(tmp_path, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        load_model(tmp_path)
    make_hf_model("llama3", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHead"]}))
    with pytest.raises(ModelLoadError, match="unsupported architecture"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "hidden_size": 48, "head_dim": 16}))
    with pytest.raises(ModelLoadError, match=r"model\.embed_tokens\.weight.*shape"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        load_model(tmp_path, dtype="int3")


def test_bf16_fast_paths_track_the_float32_reference(tmp_path: Path) -> None:
    """Fused projections, prepacked GEMMs (many rows) and the mv path (one row) in bf16."""
    from loom.engine.model_runner import ModelRunner
    from tests.helpers import single_seq_batch

    hf = make_hf_model("qwen2", tmp_path)
    model = load_model(tmp_path, dtype="bfloat16")
    model.optimize_for_inference()
    runner = ModelRunner(model, num_pages=8, page_size=16)
    ids = torch.arange(3, 40).tolist()
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0]
    prefill = runner.forward_logits(
        single_seq_batch(ids[:36], list(range(36)), list(range(8)), 36, 16), list(range(36))
    )
    decode = runner.forward_logits(single_seq_batch(ids[36:], [36], list(range(8)), 37, 16), [0])
    got = torch.cat([prefill, decode])
    scale = ref.abs().max()
    assert (got - ref).abs().max() / scale < 0.05
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("use_mv", [True, False])
def test_one_row_kernels_agree_with_the_gemm(use_mv: bool) -> None:
    """Whichever one-row kernel ``prepack`` times faster on this CPU, both compute the
    same product as ``F.linear`` (bf16 rounding aside)."""
    from loom.models.layers import Linear

    torch.manual_seed(0)
    layer = Linear(96, 40, bias=True, dtype=torch.bfloat16)
    layer.prepack()
    layer._mv_for_one_row = use_mv
    x = torch.randn(1, 96, dtype=torch.bfloat16)
    ref = torch.nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float())
    got = layer(x).float()
    assert got.shape == (1, 40)
    assert (got - ref).abs().max() / ref.abs().max() < 0.02
