"""A forward batch in the engine, as the runtime keeps track of it until it returns."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from loom.runtime.commands import CommandQueue, ForwardCmd, GenerateCmd
from loom.runtime.instance import Instance

# One command's slice of a batch: (its instance, its queue, the command, the first and
# one-past-last index of its outputs in the batch's outputs).
Part = tuple[Instance, CommandQueue, ForwardCmd | GenerateCmd, int, int]


@dataclass(eq=False)
class Flight:
    """A batch in the engine: which command produced which slice of the outputs."""

    parts: list[Part]
    plans: dict[int, int] = field(default_factory=dict)  # part index -> plan index
    submitted_at: float = field(default_factory=time.perf_counter)
    kv_sends: bool = False  # the result comes as (result, transfer results)
    nudged: bool = False  # the worker was told to cut its generation chunk short
    step0_done: bool = False  # the batch's own step was taken from a ``ChunkStep``
    replayed: dict[int, int] = field(default_factory=dict)  # part -> continued tokens taken
    forward_enqueued: int = 0  # the runtime's count of forward commands when it fired
    # Passes of decode loops (``step-chain``) in it, and how many of their next steps are
    # queued ahead: once all are, the next batch can go without waiting for the pass's
    # other guests (instances starting, say).
    chained_parts: int = 0
    followers_queued: int = 0
    ahead_tried: bool = False
