"""The exception hierarchy raised at Loom's trust boundaries.

Internal invariants use ``assert``; anything a user, a model directory or a client
can get wrong raises one of these, with a message that names the offending thing.
"""

from __future__ import annotations


class LoomError(Exception):
    """Base class of every error Loom raises on purpose."""


class ModelLoadError(LoomError):
    """A model directory is missing a file, has an unsupported architecture, or a bad tensor."""


class RequestError(LoomError, ValueError):
    """A generation request is invalid (bad prompt, bad sampling parameters)."""


class OutOfPagesError(LoomError):
    """The KV page pool cannot satisfy an allocation."""
