"""Load a Hugging Face model directory (config + single or sharded safetensors) into a CausalLM."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from loom.errors import ModelLoadError
from loom.models.config import ModelConfig
from loom.models.layers import RotaryEmbedding
from loom.models.transformer import CausalLM

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# Checkpoint keys some exporters add that carry no weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files of a directory: the shards of the index, or the single file."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (model_dir / s).is_file()]
        if missing:
            raise ModelLoadError(f"{index} names shards that are missing: {', '.join(missing)}")
        return [model_dir / s for s in shards]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {model_dir}")
    return files


def load_model(
    model_dir: str | Path,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
) -> CausalLM:
    """Build the model described by ``config.json`` and fill it from safetensors.

    Raises ``ModelLoadError`` for a missing file, an unsupported architecture, a missing
    or unexpected tensor, or a tensor whose shape differs from the config (named).
    """
    model_dir = Path(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    torch_dtype, device = resolve_dtype(dtype), torch.device(device)
    with torch.device("meta"):
        model = CausalLM(cfg)
    expected = {name: p.shape for name, p in model.named_parameters(remove_duplicate=False)}
    tensors: dict[str, torch.Tensor] = {}
    # A progress bar on a terminal only (``disable=None``): loading a real model takes a while.
    bar = tqdm(total=len(expected), desc="loading weights", unit="tensor", disable=None)
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                bar.update()
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                if name not in expected:
                    raise ModelLoadError(f"unexpected tensor {name!r} in {path.name}")
                t = f.get_tensor(name)
                if t.shape != expected[name]:
                    raise ModelLoadError(
                        f"tensor {name!r} in {path.name} has shape {tuple(t.shape)}, "
                        f"config implies {tuple(expected[name])}"
                    )
                tensors[name] = t.to(device=device, dtype=torch_dtype)
    bar.close()
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ModelLoadError(f"{len(missing)} tensors missing from {model_dir}: {shown}")
    model.load_state_dict(tensors, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # The rotary table is derived, never stored: rebuild it on the real device.
    model.model.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(device)
    return model.eval()
