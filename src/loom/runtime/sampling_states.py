"""The engine's sampling state of constrained or penalized generations, from the runtime.

A generation with a grammar or OpenAI penalties keeps its state in the worker, next to
where its tokens are sampled (``engine.sampling_state``): ``start`` sends it ahead of the
generation's first step (worker ops run in order), ``end`` drops it when the generation
finishes.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import Any

from loom.engine.sampling_state import StateSpec
from loom.engine.worker import SamplingStateOp

_log = logging.getLogger(__name__)


class SamplingStates:
    """Starts and ends generations' states in the engine worker."""

    def __init__(self, submit_op: Callable[[Any, Callable[[Any], None]], None]) -> None:
        self._submit = submit_op
        self._ids = itertools.count(1)

    def start(self, task: Any) -> None:
        """Give ``task`` (a ``GenerateTask``) a state id and start its state."""
        task.state_id = next(self._ids)
        spec = StateSpec(
            task.state_id, task.grammar, tuple(task.grammar_prefix), task.presence_penalty,
            task.frequency_penalty, tuple(task.tokens),
        )  # fmt: skip
        self._submit(SamplingStateOp(start=[spec]), _failed)

    def end(self, task: Any) -> None:
        if task.state_id is not None:
            self._submit(SamplingStateOp(end=[task.state_id]), _failed)
            task.state_id = None


def _failed(result: Any) -> None:
    # Grammars are compiled and checked before they reach the worker; one that fails there
    # anyway leaves its rows at end-of-sequence only (``SamplingStates`` of the engine).
    if isinstance(result, BaseException):
        _log.warning("sampling state: %s", result)
