"""``messaging``: the client channel, topics (broadcast/subscribe) and named channels."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loom.runtime.futures import Mailbox, Stream
from loom.runtime.host.common import add_future_resource, iface
from loom.runtime.wasm.ffi import STRING, ComponentLinker, HostCallError, borrow, own

if TYPE_CHECKING:
    from loom.runtime.services import RuntimeServices

NAME = iface("messaging")


def register(linker: ComponentLinker, rt: RuntimeServices) -> None:
    add_future_resource(linker, rt, NAME, "message-future", STRING)

    def take_next(stream: Any) -> str | None:
        return stream.items.pop(0) if stream.items else None

    add_future_resource(linker, rt, NAME, "subscription", STRING, get=take_next)

    def check_size(message: str) -> None:
        n = len(message.encode())
        if n > rt.config.max_message_bytes:
            raise HostCallError(
                f"message of {n} bytes exceeds the cap of {rt.config.max_message_bytes}"
            )

    def send(key: int, message: str) -> None:
        rt.send_to_client(rt.caller(key), message)

    def receive(key: int) -> int:
        inst = rt.caller(key)
        return rt.handles.add(inst.seq, inst.inbox.take())

    def broadcast(key: int, topic: str, message: str) -> None:
        rt.caller(key)
        check_size(message)
        for _, stream in rt.topics.get(topic, []):
            if len(stream.items) >= rt.config.max_pending_messages:
                raise HostCallError(f"a subscriber of {topic!r} has too many unread messages")
            stream.put(message)

    def subscribe(key: int, topic: str) -> int:
        inst = rt.caller(key)
        stream = Stream()
        rt.topics.setdefault(topic, []).append((inst, stream))
        inst.subscriptions.append((topic, stream))
        return rt.handles.add(inst.seq, stream)

    def unsubscribe(key: int, rep: int) -> None:
        inst = rt.caller(key)
        stream = rt.handles.get(inst.seq, rep, Stream)
        for topic, s in list(inst.subscriptions):
            if s is stream:
                inst.subscriptions.remove((topic, s))
                rt.topics[topic] = [(i, x) for i, x in rt.topics.get(topic, []) if x is not s]

    def push(key: int, channel: str, message: str) -> None:
        rt.caller(key)
        check_size(message)
        box = rt.channels.setdefault(channel, Mailbox())
        if len(box) >= rt.config.max_pending_messages:
            raise HostCallError(f"channel {channel!r} has too many unread messages")
        box.deliver(message)

    def pull(key: int, channel: str) -> int:
        inst = rt.caller(key)
        return rt.handles.add(inst.seq, rt.channels.setdefault(channel, Mailbox()).take())

    linker.add_func(NAME, "send", [STRING], None, send)
    linker.add_func(NAME, "receive", [], own("message-future"), receive)
    linker.add_func(NAME, "broadcast", [STRING, STRING], None, broadcast)
    linker.add_func(NAME, "subscribe", [STRING], own("subscription"), subscribe)
    linker.add_func(
        NAME, "[method]subscription.unsubscribe", [borrow("subscription")], None, unsubscribe
    )
    linker.add_func(NAME, "push", [STRING, STRING], None, push)
    linker.add_func(NAME, "pull", [STRING], own("message-future"), pull)
