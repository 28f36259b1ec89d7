"""What the server keeps besides the runtime: uploaded programs, the instances clients
launched (with their events, fanned out to every attached client), and counters.

Everything here lives on the server's event loop. Runtime events arrive on the runtime
thread and hop over in batches (``EventHop``).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import tempfile
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loom.config import ServeConfig
from loom.paths import cache_root
from loom.runtime.instance import InstanceResult
from loom.runtime.runtime import Runtime
from loom.server.auth import FailedAuthLimit
from loom.server.event_hop import EventHop

Event = dict[str, Any]  # {"type": "event", "instance", "event", "data"}
Subscriber = Callable[[Event], None]
FINAL_EVENTS = ("result", "error", "terminated")


def event_size(event: Event) -> int:
    """What an event holds, near enough for the byte caps: a message's characters (a str
    of n characters holds at least n bytes), a little for anything else."""
    data = event["data"]
    return 64 + (len(data) if isinstance(data, str) else 0)


@dataclass(eq=False)
class InstanceRecord:
    id: str
    program: str
    args: list[str]
    started_at: float = field(default_factory=time.time)
    status: str = "running"  # running | finished | failed | terminated
    backlog: deque[Event] = field(default_factory=deque)
    backlog_cap: int = 1000
    backlog_bytes_cap: int = 16 << 20
    backlog_bytes: int = 0  # (as ``event_size`` counts them)
    unread_dropped: int = 0  # bytes dropped from the backlog while nobody was attached
    ended_for_unread: bool = False  # (the instance was told to end for it, once)
    subscribers: dict[int, Subscriber] = field(default_factory=dict)
    terminated_by_client: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)
    handle: Any = None  # the runtime's InstanceHandle
    parent: str | None = None  # the instance that launched it (a child)
    detached: bool = False  # a child that outlives its parent

    def emit(self, kind: str, data: Any) -> None:
        event: Event = {"type": "event", "instance": self.id, "event": kind, "data": data}
        if self.backlog_cap:
            self.backlog.append(event)
            self.backlog_bytes += event_size(event)
            # The final event is never dropped; the oldest messages go first.
            backlog, cap, bytes_cap = self.backlog, self.backlog_cap, self.backlog_bytes_cap
            while len(backlog) > 1 and (len(backlog) > cap or self.backlog_bytes > bytes_cap):
                dropped = event_size(backlog.popleft())
                self.backlog_bytes -= dropped
                if not self.subscribers:
                    self._dropped_unread(dropped)
        for deliver in list(self.subscribers.values()):
            deliver(event)
        if kind in FINAL_EVENTS:
            self.done.set()

    def _dropped_unread(self, size: int) -> None:
        """No client is attached and the backlog dropped an event: an instance that
        sends on with nobody reading (its client left) is ended once it has sent more
        than the backlog holds again (it would otherwise run to its CPU budget)."""
        self.unread_dropped += size
        if (self.unread_dropped > self.backlog_bytes_cap and self.status == "running"
                and self.handle is not None and not self.ended_for_unread):  # fmt: skip
            self.ended_for_unread = True
            mib = self.backlog_bytes_cap >> 20
            self.handle.kill(f"more than {mib} MiB of its messages dropped unread (no client "
                             f"attached)")  # fmt: skip

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "program": self.program,
            "args": self.args,
            "status": self.status,
            "started_at": self.started_at,
            "attached": len(self.subscribers),
            "parent": self.parent,
            "detached": self.detached,
        }


class ServerState:
    def __init__(self, runtime: Runtime, config: ServeConfig, model_name: str) -> None:
        self.runtime = runtime
        runtime.guests.child_listener = self.on_child  # children listed as clients' are
        self.config = config
        self.model_name = model_name
        self.started_at = time.time()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.instances: dict[str, InstanceRecord] = {}
        self.finished: OrderedDict[str, InstanceRecord] = OrderedDict()  # the most recent
        self.finished_bytes = 0  # their backlogs' (at most 4 x event_backlog_mb)
        self.program_dir = Path(config.server.program_dir or cache_root() / "uploads")
        self.auth_limit = FailedAuthLimit(config.server.auth_failures_per_minute)
        self.requests_total: dict[str, int] = {}
        self.generated_tokens = 0
        self.prompt_tokens = 0

    # ----- authentication -----

    def check_key(self, key: str | None) -> bool:
        if not self.config.server.api_keys:
            return True
        if not key:
            return False
        return any(
            hmac.compare_digest(key.encode(), k.encode()) for k in self.config.server.api_keys
        )

    # ----- programs -----

    def has_program(self, digest: str) -> bool:
        """Loaded, or uploaded before (this run or an earlier one): then load it now."""
        if digest in self.runtime.programs:
            return True
        path = self.program_dir / f"{digest}.wasm"
        if path.is_file():
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() == digest:
                self.runtime.add_program(data)
                return True
        return False

    def save_program(self, data: bytes) -> str:
        """Compile (cached by hash) and keep the program for later runs; returns its hash."""
        digest = self.runtime.add_program(data)
        self.program_dir.mkdir(parents=True, exist_ok=True)
        path = self.program_dir / f"{digest}.wasm"
        if not path.exists():  # a private temp name: two clients may upload it at once
            fd, tmp = tempfile.mkstemp(dir=self.program_dir, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        return digest

    # ----- instances -----

    def launch(self, program: str, args: list[str]) -> InstanceRecord:
        loop = self.loop
        assert loop is not None, "the server's event loop is not set"
        record: InstanceRecord | None = None
        early: list[tuple[str, Any]] = []

        def deliver(kind: str, payload: Any) -> None:  # event loop
            if record is None:
                early.append((kind, payload))
            else:
                self._on_runtime_event(record, kind, payload)

        hop = EventHop(loop, deliver)
        handle = self.runtime.launch(program, args, listener=hop)
        record = self._record(handle, program, args)
        self.instances[record.id] = record
        for kind, payload in early:
            self._on_runtime_event(record, kind, payload)
        return record

    def _record(self, handle: Any, program: str, args: list[str], parent: str | None = None,
                detached: bool = False) -> InstanceRecord:  # fmt: skip
        server = self.config.server
        return InstanceRecord(handle.id, program, args, handle=handle, parent=parent,
                              detached=detached, backlog_cap=server.event_backlog,
                              backlog_bytes_cap=server.event_backlog_mb << 20)  # fmt: skip

    def on_child(self, handle: Any, program: str, args: list[str], parent: str,
                 detached: bool) -> Callable[[str, Any], None] | None:  # fmt: skip
        """Runtime thread: an instance launched a child. It gets a record as a client's
        instance does (listed, attachable, terminable); its events hop to the loop."""
        loop = self.loop
        if loop is None:
            return None
        record = self._record(handle, program, args, parent, detached)

        def register() -> None:  # event loop, before any of its events (FIFO)
            self.instances[record.id] = record

        loop.call_soon_threadsafe(register)
        return EventHop(loop, lambda kind, payload: self._on_runtime_event(record, kind, payload))

    def _on_runtime_event(self, record: InstanceRecord, kind: str, payload: Any) -> None:
        if kind == "message":
            record.emit("message", payload)
        elif kind == "log":
            level, text = payload
            record.emit("log", {"level": level, "text": text})
        elif kind == "end":
            result: InstanceResult = payload
            if result.ok:
                record.status = "finished"
                record.emit("result", {"cpu_s": result.cpu_s, "tokens": result.tokens})
            elif record.terminated_by_client:
                record.status = "terminated"
                record.emit("terminated", {"reason": result.error or "terminated"})
            else:
                record.status = "failed"
                record.emit("error", {"message": result.error or "the instance failed"})
            self.instances.pop(record.id, None)
            self.finished[record.id] = record
            self.finished_bytes += record.backlog_bytes
            cap = 4 * self.config.server.event_backlog_mb << 20
            while len(self.finished) > 1000 or self.finished_bytes > cap:
                self.finished_bytes -= self.finished.popitem(last=False)[1].backlog_bytes

    def find(self, instance_id: str) -> InstanceRecord | None:
        return self.instances.get(instance_id) or self.finished.get(instance_id)

    def terminate(self, record: InstanceRecord) -> None:
        record.terminated_by_client = True
        record.handle.kill()

    def count(self, route: str) -> None:
        self.requests_total[route] = self.requests_total.get(route, 0) + 1
