"""One running inferlet: its store, its fiber call, its resources and its accounting."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loom.runtime.commands import CommandQueue
from loom.runtime.futures import HostFuture, Mailbox, Stream
from loom.runtime.guest_engines import WasmSide
from loom.runtime.resources import InstancePages, InstanceTree
from loom.runtime.wasm.ffi import CallFuture, GuestStore


@dataclass
class InstanceResult:
    """How an instance ended. ``ok`` is False for a trap, a limit, a kill or an error."""

    instance_id: str
    ok: bool
    error: str | None
    cpu_s: float
    tokens: int


EventListener = Callable[[str, Any], None]


@dataclass(frozen=True, slots=True)
class Deliver:
    """Inbox message: hand ``message`` to the instance's ``messaging.receive``."""

    instance_id: str
    message: str


@dataclass(frozen=True, slots=True)
class Kill:
    """Inbox message: terminate the instance (a client's kill, a cancelled completion)."""

    instance_id: str
    reason: str


class InstanceHandle:
    """The client's side of an instance; safe to use from any thread.

    Without a ``listener``, messages the instance sends queue up in ``messages``. With one,
    every event is handed to it on the runtime thread as ``(kind, payload)``: ``("message",
    str)``, ``("log", (level, str))`` and finally ``("end", InstanceResult)``. The listener
    must not block (the server hops each event onto its event loop). A listener with a
    backlog of its own also has ``full`` (read after each message) and
    ``when_drained(fn)`` (calls ``fn``, from any thread, once the backlog has been taken;
    False when there is none): a sender it is full for pauses until then.
    """

    def __init__(
        self, instance_id: str, post: Callable[[Any], None], listener: EventListener | None = None
    ) -> None:
        self.id = instance_id
        self._post = post  # runtime inbox poster
        self.listener = listener
        self.messages: queue.Queue[str] = queue.Queue()
        self.result: InstanceResult | None = None
        self.launched_at = time.perf_counter()
        self.finished_at: float | None = None  # perf_counter time the result was set
        # When the engine first and last sampled a token (or returned a pass's outputs)
        # for it, and how many times: time per output token, as a reader would see it.
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.sampled = 0
        self._done = threading.Event()

    def send(self, message: str) -> None:
        """Deliver a message to the instance's ``messaging.receive``."""
        self._post(Deliver(self.id, message))

    def kill(self, reason: str = "killed by the client") -> None:
        self._post(Kill(self.id, reason))

    def recv(self, timeout: float | None = None) -> str:
        """The next message the instance sent (raises ``queue.Empty`` on timeout)."""
        return self.messages.get(timeout=timeout)

    def wait(self, timeout: float | None = None) -> InstanceResult:
        if not self._done.wait(timeout):
            raise TimeoutError(f"instance {self.id} still running after {timeout}s")
        assert self.result is not None
        return self.result

    def _note_tokens(self, now: float, n: int) -> None:
        """Runtime thread: ``n`` tokens (or outputs) for it came back at ``now``."""
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now
        self.sampled += n

    def _finish(self, result: InstanceResult) -> None:
        self.finished_at = time.perf_counter()
        self.result = result
        self._done.set()
        if self.listener is not None:
            self.listener("end", result)

    @property
    def done(self) -> bool:
        return self._done.is_set()


@dataclass(eq=False, slots=True)
class Instance:
    seq: int  # launch order (kill-newest picks the highest)
    id: str
    program: str
    arguments: list[str]
    store: GuestStore
    pages: InstancePages
    handle: InstanceHandle
    call: CallFuture | None = None
    started: bool = False  # instantiation done, `run` called
    blocked: Any = None  # what a suspended guest waits on (a PollWait, a native wait)
    native_error: str | None = None  # a native inferlet's loom_fail message
    queued: bool = False  # on the run queue
    alive: bool = True
    kill_reason: str | None = None
    cpu_s: float = 0.0
    tokens: int = 0
    inbox: Mailbox = field(default_factory=Mailbox)
    queues: list[CommandQueue] = field(default_factory=list)
    subscriptions: list[tuple[str, Stream]] = field(default_factory=list)
    spawned_at: float = 0.0
    ran_at: float = 0.0  # perf_counter time its last turn ended (the idle limit)
    submitted: bool = False  # queued forward work during its current time slice
    spawn_s: float | None = None  # launch -> ready to run (instantiation done)
    job: Any = None  # a host-driven completion (no guest code) when set
    side: WasmSide = None  # type: ignore[assignment]  # the engine it runs in (guests)
    wake: Callable[[], None] | None = None  # puts it on the run queue (made once)
    cohort: Any = None  # its launch ``Cohort`` while its first turn has not ended
    # The instance that launched it (None: a client did, or it was launched detached),
    # and its own live children, terminated when it ends.
    parent: Instance | None = None
    children: list[Instance] = field(default_factory=list)
    # The tree of instances it belongs to (a guest's; None for host-driven ones).
    tree: InstanceTree | None = None
    # Its end as a future (``Ok(None)``, or ``Err(why)``), and those of every child it
    # launched (detached ones too), by id: what ``runtime.wait-child`` hands out.
    ended: HostFuture = field(default_factory=HostFuture)
    child_ends: dict[str, HostFuture] = field(default_factory=dict)
