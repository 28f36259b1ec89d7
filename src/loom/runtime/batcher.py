"""Cross-inferlet batching: when to fire, and which forward commands go in the batch.

Every queue keeps FIFO order. At fire time the batcher visits queues by priority (high
first, then by age) and takes the forward command at each head, plus the consecutive
forward commands behind it that touch none of the same pages (vertical merging; a pass
that reads pages an earlier pass of the batch writes must wait for the next step). Same-
kind commands of all queues thus ride one engine batch.

Firing policies (the original system's Table 5):
- ``adaptive`` (default): fire whenever the engine is free, with everything that arrived
  meanwhile — work-conserving, no tuning knob. One refinement: when at least as many
  guests are runnable (typically those the last batch just woke, each about to submit a
  decode step) as tokens wait, and their turns together take less than an engine step,
  the guests run first and the batch fires after them. Firing at once would split the
  instances into two cohorts that alternate on the engine for ever (one computes while
  the other runs its guests), and a decode step costs nearly the same at batch 4 as at
  batch 32: measured on the ~40M model, 28 + 4 instances took two passes per token
  (~90 ms) where one batch of 32 takes ~50 ms plus the guests' turns (~15 ms). When the
  guests' turns outweigh the step (many guests, a fast model), holding would idle the
  engine for longer than a second pass costs, and cohorts overlap the two: measured on
  the tiny model, 64 guests held lost ~20 % of the tokens/s. A prefill waiting (many
  tokens) fires at once: its cost grows with its tokens, so nothing is gained by holding
  it, and the engine would idle while guests start.
  Passes ahead (``step-chain``: a decode loop's next step, queued before the guest
  has seen its token) fire at once: their guests' turns run during the batch.
- ``k``: fire once ``k`` forward commands are waiting, or when no more can arrive (no
  guest is runnable: every live instance waits), else fewer than ``k`` live inferlets
  would wait forever.
- ``t``: fire once the oldest waiting command has waited ``t`` ms.
- ``k_or_t``: whichever comes first.
At most one batch is in flight: the engine runs one step at a time.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

from loom.config import RuntimeConfig
from loom.runtime.commands import (
    FORWARD_KINDS,
    CommandQueue,
    ForwardCmd,
    GenerateCmd,
    head_tokens,
)

_PRIORITY = operator.attrgetter("priority")


@dataclass
class FireDecision:
    fire: bool
    wait_s: float | None = None  # for "t": how long until it would fire


class Batcher:
    def __init__(self, config: RuntimeConfig) -> None:
        self.config = config
        self.queues: list[CommandQueue] = []

    def add_queue(self, q: CommandQueue) -> None:
        self.queues.append(q)

    def remove_owner(self, owner: int) -> None:
        self.queues = [q for q in self.queues if q.owner != owner]

    def ready_heads(self) -> list[CommandQueue]:
        """Queues whose head is a forward-kind command, in firing order."""
        heads = []
        for q in self.queues:  # every queue, a few times a turn: no method call per queue
            cmds, head = q.cmds, q.head
            if head >= len(cmds) or q.held:
                continue
            cmd = cmds[head]
            if isinstance(cmd, ForwardCmd):
                src = cmd.ahead_of  # ``cmd.ready()``: a pass ahead once its source returned
                if src is None or src.future.done:
                    heads.append(q)
            elif isinstance(cmd, GenerateCmd):
                heads.append(q)
        # Stable, also reversed: equal priorities keep their age order.
        heads.sort(key=_PRIORITY, reverse=True)
        return heads

    def guestless_work_ready(self) -> bool:
        """A head that no guest's turn adds to: a host generation or a pass ahead."""
        for q in self.queues:
            cmds, head = q.cmds, q.head
            if head < len(cmds) and not q.held:
                cmd = cmds[head]
                if isinstance(cmd, GenerateCmd) or (
                    isinstance(cmd, ForwardCmd) and cmd.is_ahead and cmd.ready()
                ):
                    return True
        return False

    def any_queued(self) -> bool:
        """Some queue holds a command."""
        return any(q.head < len(q.cmds) for q in self.queues)

    def decide(
        self,
        engine_busy: bool,
        heads: list[CommandQueue],
        now: float,
        *,
        guests_idle: bool,
        runnable_before_guests: int = 0,
        guest_turn_s: float = 0.0,
        engine_step_s: float = 0.0,
    ) -> FireDecision:
        """``guests_idle``: no guest is runnable, so no command can arrive before a result.
        ``runnable_before_guests``: asked before this turn's guests run, how many are
        runnable (0 when asked after them); ``guest_turn_s`` and ``engine_step_s``: recent
        typical times of a guest's turn that submits a pass and of an engine step."""
        if engine_busy or not heads:
            return FireDecision(False)
        policy = self.config.batch_policy
        if policy == "adaptive":
            runnable = runnable_before_guests
            hold = (
                runnable > 0
                and not any(_is_ahead(q) for q in heads)
                and runnable * guest_turn_s < engine_step_s
                and runnable >= sum(head_tokens(q) for q in heads)
            )
            return FireDecision(not hold)
        n = sum(1 for q in heads for _ in _forward_run(q))
        oldest = min(_submitted(q) for q in heads)
        waited = now - oldest
        t = self.config.batch_t_ms / 1000.0
        if policy in ("k", "k_or_t") and n >= self.config.batch_k:
            return FireDecision(True)
        if policy == "k":
            return FireDecision(guests_idle)
        if policy in ("t", "k_or_t"):
            if waited >= t:
                return FireDecision(True)
            return FireDecision(False, wait_s=t - waited)
        return FireDecision(False)


def _is_ahead(q: CommandQueue) -> bool:
    """The head is a pass ahead: the guests' turns were taken while the last batch ran,
    so nothing is gained by holding the batch for them."""
    cmd = q.peek()
    return isinstance(cmd, ForwardCmd) and cmd.is_ahead


def _submitted(q: CommandQueue) -> float:
    cmd = q.peek()
    assert isinstance(cmd, FORWARD_KINDS)
    return cmd.submitted_at


def _forward_run(q: CommandQueue) -> list[ForwardCmd | GenerateCmd]:
    """The head forward command and the consecutive independent ones behind it."""
    i = q.head
    if i + 1 >= len(q.cmds):  # the usual case: one command waiting, nothing to merge
        cmd = q.cmds[i] if i < len(q.cmds) else None
        return [cmd] if isinstance(cmd, (ForwardCmd, GenerateCmd)) else []
    out: list[ForwardCmd | GenerateCmd] = []
    pages: set[int] = set()
    while i < len(q.cmds):
        cmd = q.cmds[i]
        if isinstance(cmd, GenerateCmd):
            if not out:
                out.append(cmd)  # a generation owns its queue's head until it finishes
            break
        if not isinstance(cmd, ForwardCmd) or not cmd.ready() or pages.intersection(cmd.pages):
            break
        pages.update(cmd.pages)
        out.append(cmd)
        i += 1
    return out


def take_forward_run(q: CommandQueue) -> list[ForwardCmd | GenerateCmd]:
    """Pop the head run for a batch (a generation stays at the head)."""
    run = _forward_run(q)
    for cmd in run:
        if isinstance(cmd, ForwardCmd):
            q.pop()
    return run


def take_pass_ahead(q: CommandQueue) -> list[ForwardCmd | GenerateCmd]:
    """Pop the pass ahead at the head of ``q`` for a batch sent before its token is
    known (nothing behind it joins: it may read what it writes)."""
    cmd = q.pop()
    assert isinstance(cmd, ForwardCmd) and cmd.is_ahead
    return [cmd]
