"""The configuration of every part of Loom, in one place (``sections``), and the
machinery that turns its fields into command-line flags and TOML keys (``fields``)."""

from loom.config.fields import Setting, add_flags, settings_of
from loom.config.sections import (
    SERVE_SECTIONS,
    BatchPolicy,
    EngineConfig,
    KVTransport,
    OutOfPagesPolicy,
    RouterConfig,
    RuntimeConfig,
    ServeConfig,
    ServerConfig,
)

__all__ = [
    "SERVE_SECTIONS",
    "BatchPolicy",
    "EngineConfig",
    "KVTransport",
    "OutOfPagesPolicy",
    "RouterConfig",
    "RuntimeConfig",
    "ServeConfig",
    "ServerConfig",
    "Setting",
    "add_flags",
    "settings_of",
]
