"""Messages between inferlets and their clients: the client channel, topics (broadcast to
every subscriber), named channels (each message to one puller) and the key-value store.

All of it runs on the runtime thread; the caps (``max_message_bytes``, and per reader
``max_pending_messages`` and ``max_pending_mb``, ``max_subscriptions`` per instance) keep
one inferlet or client from filling the server's memory with messages nobody reads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loom.config import RuntimeConfig
from loom.runtime.futures import HostFuture, Mailbox, PollWait, Stream
from loom.runtime.instance import Instance
from loom.runtime.shared_store import SharedStore
from loom.runtime.wasm.ffi import HostCallError


def pause_if_backlogged(
    inst: Instance,
    call_soon: Callable[[Callable[[], None]], None],
    waker: Callable[[Instance], Callable[[], None]],
) -> None:
    """After a message to its client: while the messages on their way to the client
    (the server's loop) are over its hop's bound, the sender's time slice ends now and it
    waits until they are taken. A flood then goes at the pace its client is served at,
    and the loop never has more than a bounded batch of one instance's messages to do."""
    hop: Any = inst.handle.listener  # (see ``InstanceHandle``: a listener with a backlog)
    if not getattr(hop, "full", False) or inst.blocked is not None:
        return
    drained = HostFuture()
    if hop.when_drained(lambda: call_soon(lambda: drained.resolve(None))):
        inst.blocked = PollWait([drained], waker(inst))
        inst.store.end_slice()


class Messaging:
    """The runtime's message state: topics, channels and the key-value store."""

    def __init__(self, config: RuntimeConfig) -> None:
        self.config = config
        self.store_kv = SharedStore()
        self.topics: dict[str, list[tuple[Instance, Stream]]] = {}
        self.channels: dict[str, Mailbox] = {}

    def check_size(self, message: str) -> None:
        n = len(message.encode())
        if n > self.config.max_message_bytes:
            raise HostCallError(
                f"message of {n} bytes exceeds the cap of {self.config.max_message_bytes}"
            )

    def has_room(self, count: int, size: int, message: str) -> bool:
        """Whether a reader holding ``count`` unread messages of ``size`` characters may
        take ``message`` too (a str of n characters holds at least n bytes)."""
        config = self.config
        return (count < config.max_pending_messages
                and size + len(message) <= config.max_pending_mb << 20)  # fmt: skip

    def deliver_from_client(self, inst: Instance, message: str) -> str | None:
        """Hand a client's message to ``inst``; past the caps, the message is dropped and
        the reason returned: an instance that leaves its client's messages unread is
        ended (they would otherwise pile up without bound)."""
        box = inst.inbox
        if not self.has_room(len(box), box.size, message):
            return (f"more than {self.config.max_pending_messages} messages or "
                    f"{self.config.max_pending_mb} MiB from its client unread")  # fmt: skip
        box.deliver(message)
        return None

    def send_to_client(self, inst: Instance, message: str) -> None:
        """Hand ``message`` to the instance's client (its listener, else its queue)."""
        self.check_size(message)
        listener = inst.handle.listener
        if listener is not None:
            listener("message", message)
            return
        if inst.handle.messages.qsize() >= self.config.max_pending_messages:
            raise HostCallError(
                f"more than {self.config.max_pending_messages} unread messages to the client"
            )
        inst.handle.messages.put(message)

    def broadcast(self, topic: str, message: str) -> None:
        """Put ``message`` on every subscription of ``topic``."""
        self.check_size(message)
        for _, stream in self.topics.get(topic, []):
            if not self.has_room(len(stream.items), stream.size, message):
                raise HostCallError(f"a subscriber of {topic!r} has too many unread messages")
            stream.put(message)

    def subscribe(self, inst: Instance, topic: str) -> Stream:
        if len(inst.subscriptions) >= self.config.max_subscriptions:
            raise HostCallError(f"more than {self.config.max_subscriptions} subscriptions")
        stream = Stream()
        self.topics.setdefault(topic, []).append((inst, stream))
        inst.subscriptions.append((topic, stream))
        return stream

    def unsubscribe(self, inst: Instance, stream: Stream) -> None:
        for topic, s in list(inst.subscriptions):
            if s is stream:
                inst.subscriptions.remove((topic, s))
                self._drop(topic, s)

    def push(self, channel: str, message: str) -> None:
        """Queue ``message`` on ``channel`` for one puller."""
        self.check_size(message)
        box = self.channels.setdefault(channel, Mailbox())
        if not self.has_room(len(box), box.size, message):
            raise HostCallError(f"channel {channel!r} has too many unread messages")
        box.deliver(message)

    def channel(self, name: str) -> Mailbox:
        return self.channels.setdefault(name, Mailbox())

    def drop_instance(self, inst: Instance) -> None:
        """An instance ended: its subscriptions go."""
        for topic, stream in inst.subscriptions:
            self._drop(topic, stream)

    def _drop(self, topic: str, stream: Stream) -> None:
        subs = [(i, s) for i, s in self.topics.get(topic, []) if s is not stream]
        if subs:
            self.topics[topic] = subs
        else:
            self.topics.pop(topic, None)
