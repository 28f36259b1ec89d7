"""``loom model info``: what a model directory holds, read from headers only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors import safe_open

from loom.models.config import ModelConfig
from loom.models.loader import safetensors_files


def model_info(model_dir: str | Path) -> dict[str, Any]:
    """Config fields plus parameter count and bytes as stored (no tensor is loaded)."""
    model_dir = Path(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    num_params = num_bytes = 0
    dtypes: set[str] = set()
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                sl = f.get_slice(name)
                n = 1
                for d in sl.get_shape():
                    n *= d
                dtype = sl.get_dtype()
                dtypes.add(dtype)
                num_params += n
                num_bytes += n * {"F32": 4, "BF16": 2, "F16": 2}.get(dtype, 4)
    fields = {k: v for k, v in vars(cfg).items() if v not in (None, (), {})}
    return {
        "path": str(model_dir),
        **fields,
        "num_params": num_params,
        "weight_bytes": num_bytes,
        "stored_dtypes": sorted(dtypes),
    }
