"""What the runtime's parts may use of the runtime: the host API modules, completions,
the context cache, microserving and the loop's own parts (guests, eager commands,
dispatch) take a ``RuntimeServices``, a protocol of the
attributes and calls they need, so they depend on this narrow view rather than on
``runtime.py`` (which imports them: no import cycle). ``Runtime`` satisfies it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from loom.runtime.histogram import BATCH_SIZES, STEP_SECONDS, Histogram

if TYPE_CHECKING:
    from loom.config import RuntimeConfig
    from loom.engine.grammar import GrammarCompiler
    from loom.engine.page_pool import PagePool
    from loom.engine.prefix_cache import PrefixCache
    from loom.models.config import ModelConfig
    from loom.models.tokenizer import Tokenizer
    from loom.runtime.commands import AllocateCmd, CommandQueue
    from loom.runtime.guest_engines import GuestEngines
    from loom.runtime.instance import EventListener, Instance, InstanceHandle
    from loom.runtime.messaging import Messaging
    from loom.runtime.program_cache import ProgramCache
    from loom.runtime.resources import ExportRegistry, HandleTable
    from loom.runtime.wasm.ffi import WasmEngine


VERSION = "0.1.0"  # the runtime's, as ``runtime.version`` reports it


@dataclass(slots=True)
class RuntimeStats:
    """Counters for benchmarks and tests (read them from any thread; approximate)."""

    batches: int = 0
    forward_cmds: int = 0
    batch_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=100_000))
    guest_polls: int = 0
    poll_s: float = 0.0  # time inside guest fibers (guest work + host calls it made)
    loop_s: float = 0.0  # time of loop turns that did work
    turns: int = 0  # loop turns (each looks at the inbox, the engine and every queue)
    spawned: int = 0
    spawn_s: deque[float] = field(default_factory=lambda: deque(maxlen=100_000))
    continued_tokens: int = 0  # tokens the worker generated on its own (generate chunks)
    batch_tokens: int = 0  # tokens put through the model
    nudges: int = 0  # generation chunks the worker was asked to cut short
    chained_batches: int = 0  # batches of passes ahead sent while the one before ran
    sampled_tokens: int = 0  # tokens sampled for inferlets and completions
    context_cached_tokens: int = 0  # inferlet context tokens taken from the prefix cache
    # What the engine did, as a GPU would feel it: passes (a generation chunk's steps
    # included), the sequences in them, and the engine's idle time between a pass's
    # result and the next pass while work was ready (guests to run or commands queued).
    engine_passes: int = 0
    pass_seqs: int = 0
    engine_idle_s: float = 0.0
    idle_gaps: int = 0
    step_latency: Histogram = field(default_factory=lambda: Histogram(STEP_SECONDS))
    batch_size_hist: Histogram = field(default_factory=lambda: Histogram(BATCH_SIZES))


class RuntimeServices(Protocol):
    """The runtime as its parts see it (all of it runs on the runtime thread but
    ``post``, ``call_soon`` and ``launch``)."""

    # The model.
    page_size: int
    vocab_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    model_name: str
    model_config: ModelConfig
    tokenizer: Tokenizer
    grammars: GrammarCompiler
    # State the parts share.
    config: RuntimeConfig
    pool: PagePool
    prefix_cache: PrefixCache
    handles: HandleTable
    exports: ExportRegistry
    messaging: Messaging
    instances: dict[str, Instance]
    stats: RuntimeStats
    wasm: WasmEngine  # (``engines.own``'s: host completions' stores)
    programs: ProgramCache
    engines: GuestEngines

    def caller(self, key: int) -> Instance:
        """The live instance whose guest is making the current host call."""
        ...

    def next_seq(self) -> int: ...

    def register_instance(self, inst: Instance) -> None: ...

    def end_instance(self, inst: Instance, ok: bool, error: str | None) -> None: ...

    def kill(self, inst: Instance, reason: str) -> None:
        """End ``inst`` between guest runs (safe from a host call)."""
        ...

    def new_queue(self, inst: Instance) -> CommandQueue: ...

    def enqueue(self, q: CommandQueue, cmd: Any) -> None: ...

    def waker(self, inst: Instance) -> Callable[[], None]: ...

    def allocate_pages(
        self, inst: Instance, n: int, cmd: AllocateCmd | None = None
    ) -> list[int] | None: ...

    def submit_op(self, op: Any, callback: Callable[[Any], None]) -> None: ...

    def track_op(self, op: Any) -> None: ...

    def launch(
        self, program: str, arguments: list[str] | None = None,
        listener: EventListener | None = None,
    ) -> InstanceHandle: ...  # fmt: skip

    def launch_child(
        self, parent: Instance, program: str, args: list[str], detached: bool = False
    ) -> InstanceHandle | str: ...

    def call_soon(self, fn: Callable[[], Any]) -> None: ...

    def post(self, item: Any) -> None:
        """Hand the runtime thread a message (any thread): one of ``inbox.InboxMessage``
        (typed loosely here: the inbox names completions, which see this protocol)."""
        ...
