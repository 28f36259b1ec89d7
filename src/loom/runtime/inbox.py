"""What other threads hand the runtime thread (``Runtime.post``), one dataclass per kind;
the loop takes them in order at the start of each turn. ``Deliver`` and ``Kill`` (about a
running instance) live in ``instance.py``, which posts them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loom.runtime.completions import CompletionRequest
from loom.runtime.instance import Deliver, InstanceHandle, Kill


@dataclass(frozen=True, slots=True)
class Launch:
    """Start an instance of ``program`` with ``args``, reported through ``handle``."""

    handle: InstanceHandle
    program: str
    args: list[str]


@dataclass(frozen=True, slots=True)
class LaunchBatch:
    """Start one instance per argument list as a cohort (first passes together)."""

    handles: list[InstanceHandle]
    program: str
    args: list[list[str]]


@dataclass(frozen=True, slots=True)
class StartCompletion:
    """Start a host-driven completion (an OpenAI API choice)."""

    handle_id: str
    request: CompletionRequest


@dataclass(frozen=True, slots=True)
class Call:
    """Run ``fn`` on the runtime thread (``Runtime.call_soon``)."""

    fn: Callable[[], Any]


InboxMessage = Launch | LaunchBatch | StartCompletion | Call | Deliver | Kill
