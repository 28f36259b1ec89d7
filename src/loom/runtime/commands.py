"""Commands an inferlet queues; the batcher and the runtime loop execute them in order.

Forward-kind commands (``ForwardCmd``, ``GenerateCmd``) wait for the batcher to fire and
run merged with those of every other queue in one engine batch. All other commands are
*eager*: they run as soon as they reach the head of their queue.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loom.engine.batch import OutputSpec
from loom.runtime.futures import HostFuture

if TYPE_CHECKING:
    from loom.runtime.generate_task import GenerateTask


@dataclass(eq=False, slots=True)
class ForwardCmd:
    tokens: list[int]
    positions: list[int]
    pages: list[int]  # virtual ids
    last_page_len: int
    masks: list[list[int]] | None
    outputs: list[OutputSpec]  # indices local to this pass
    future: HostFuture
    submitted_at: float = 0.0
    kv_send: Any = None  # a KVSendSpec: ship this pass's KV to another engine, layer by layer
    kv_result: Any = None  # its KVTransferResult, set before the future resolves
    # A pass ahead (``step-chain``): its one input token is the token ``ahead_of`` samples,
    # filled in when that pass returns (then the link is dropped); until then it cannot
    # ride a batch, except one sent behind the batch that pass rides.
    is_ahead: bool = False
    ahead_of: ForwardCmd | None = None
    then: ForwardCmd | None = None  # the pass ahead waiting for this one's token
    flight: Any = None  # the batch it rides, once fired, until it returns
    out_index: int = -1  # and the index of its (first) output in that batch's outputs
    # A context's first pass: (its tokens, the physical full pages it writes, held) to
    # publish to the prefix cache when it returns (``context_cache``).
    publish: tuple[list[int], list[int]] | None = None

    @property
    def num_tokens(self) -> int:
        """Tokens this command puts through the engine when it next rides a batch."""
        return len(self.tokens)

    def ready(self) -> bool:
        """Its inputs are known (always, unless it is a pass ahead of a running pass)."""
        return self.ahead_of is None or self.ahead_of.future.done


@dataclass(eq=False)
class GenerateCmd:
    task: GenerateTask
    submitted_at: float = 0.0
    since: float = 0.0  # when its next step first found the pool short (wait timeout)

    @property
    def num_tokens(self) -> int:
        """Tokens this command puts through the engine when it next rides a batch."""
        return len(self.task.pending)


@dataclass(eq=False)
class AllocateCmd:
    virtual: list[int]
    since: float = 0.0  # when it first found the pool short (for the wait timeout)


@dataclass(eq=False)
class FreeCmd:
    virtual: list[int]


@dataclass(eq=False)
class CopyCmd:
    src: int
    dst: int
    src_offset: int
    dst_offset: int
    size: int


@dataclass(eq=False)
class MaskCmd:
    page: int
    keep: list[bool]


@dataclass(eq=False)
class ExportCmd:
    virtual: list[int]
    name: str
    persistent: bool


@dataclass(eq=False)
class UnexportCmd:
    name: str


@dataclass(eq=False)
class PublishCmd:
    """Let every program import the export ``name`` (its owner's call)."""

    name: str


@dataclass(eq=False)
class SyncCmd:
    future: HostFuture


Command = (
    ForwardCmd
    | GenerateCmd
    | AllocateCmd
    | FreeCmd
    | CopyCmd
    | MaskCmd
    | ExportCmd
    | UnexportCmd
    | PublishCmd
    | SyncCmd
)
FORWARD_KINDS = (ForwardCmd, GenerateCmd)


@dataclass(eq=False)
class CommandQueue:
    """One FIFO of commands; queues are independent of each other."""

    owner: int  # instance id
    priority: int = 1  # 0 low, 1 normal, 2 high
    cmds: list[Command] = field(default_factory=list)
    head: int = 0  # index of the next command (a list with a moving head: cheap FIFO)
    inflight: int = 0  # forward commands submitted to the engine and not yet returned
    failed: bool = False  # an earlier command failed (reported by synchronize)
    ahead: ForwardCmd | None = None  # the pass ahead ``step-chain`` queued, until settled
    held: bool = False  # its owner's launch cohort is still starting (``cohort``)

    def peek(self) -> Command | None:
        return self.cmds[self.head] if self.head < len(self.cmds) else None

    def pop(self) -> Command:
        cmd = self.cmds[self.head]
        self.head += 1
        if self.head > 64 and self.head * 2 > len(self.cmds):
            del self.cmds[: self.head]
            self.head = 0
        return cmd

    def push(self, cmd: Command) -> None:
        self.cmds.append(cmd)

    def __len__(self) -> int:
        return len(self.cmds) - self.head

    def withdraw(self, cmd: Command) -> bool:
        """Take ``cmd`` out if it is still waiting in the queue; whether it was."""
        for i in range(self.head, len(self.cmds)):
            if self.cmds[i] is cmd:
                del self.cmds[i]
                return True
        return False


def head_tokens(q: CommandQueue) -> int:
    """Tokens the forward-kind command at the head of ``q`` puts through the engine."""
    cmd = q.peek()
    assert isinstance(cmd, (ForwardCmd, GenerateCmd))
    return cmd.num_tokens
