"""Loom: a programmable LLM serving system.

Public names are imported lazily so that light parts (the client, the CLI's help) do not
pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "loom.llm",
    "Engine": "loom.engine.engine",
    "EngineConfig": "loom.config",
    "RequestOutput": "loom.engine.request",
    "SamplingParams": "loom.sampling_params",
}
__all__ = ["LLM", "Engine", "EngineConfig", "RequestOutput", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from loom.config import EngineConfig
    from loom.engine.engine import Engine
    from loom.engine.request import RequestOutput
    from loom.llm import LLM
    from loom.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'loom' has no attribute {name!r}")
