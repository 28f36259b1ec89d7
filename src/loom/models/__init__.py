"""Model families, Hugging Face loading, tokenizer and the embedded tiny model."""

from __future__ import annotations

from pathlib import Path

from loom.errors import ModelLoadError

TINY_MODEL_NAME = "tiny"


def resolve_model_dir(model: str | Path) -> Path:
    """``"tiny"`` -> the cached embedded default (made on first use); else a directory."""
    if str(model) == TINY_MODEL_NAME:
        from loom.models.tiny import ensure_tiny_model

        return ensure_tiny_model()
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"model directory {str(path)!r} does not exist (or use 'tiny')")
    return path
