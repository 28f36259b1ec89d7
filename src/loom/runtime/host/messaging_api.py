"""``messaging``: the client channel, topics (broadcast/subscribe) and named channels."""

from __future__ import annotations

from typing import TYPE_CHECKING

from loom.runtime.futures import Stream
from loom.runtime.host.common import add_future_resource, iface
from loom.runtime.messaging import pause_if_backlogged
from loom.runtime.wasm.ffi import STRING, ComponentLinker, borrow, own

if TYPE_CHECKING:
    from loom.runtime.services import RuntimeServices

NAME = iface("messaging")


def register(linker: ComponentLinker, rt: RuntimeServices) -> None:
    add_future_resource(linker, rt, NAME, "message-future", STRING)

    add_future_resource(linker, rt, NAME, "subscription", STRING, get=lambda s: s.pop())

    bus = rt.messaging

    def send(key: int, message: str) -> None:
        inst = rt.caller(key)
        bus.send_to_client(inst, message)
        pause_if_backlogged(inst, rt.call_soon, rt.waker)

    def receive(key: int) -> int:
        inst = rt.caller(key)
        return rt.handles.add(inst.seq, inst.inbox.take())

    def broadcast(key: int, topic: str, message: str) -> None:
        rt.caller(key)
        bus.broadcast(topic, message)

    def subscribe(key: int, topic: str) -> int:
        inst = rt.caller(key)
        return rt.handles.add(inst.seq, bus.subscribe(inst, topic))

    def unsubscribe(key: int, rep: int) -> None:
        inst = rt.caller(key)
        bus.unsubscribe(inst, rt.handles.get(inst.seq, rep, Stream))

    def push(key: int, channel: str, message: str) -> None:
        rt.caller(key)
        bus.push(channel, message)

    def pull(key: int, channel: str) -> int:
        inst = rt.caller(key)
        return rt.handles.add(inst.seq, bus.channel(channel).take())

    linker.add_func(NAME, "send", [STRING], None, send)
    linker.add_func(NAME, "receive", [], own("message-future"), receive)
    linker.add_func(NAME, "broadcast", [STRING, STRING], None, broadcast)
    linker.add_func(NAME, "subscribe", [STRING], own("subscription"), subscribe)
    linker.add_func(
        NAME, "[method]subscription.unsubscribe", [borrow("subscription")], None, unsubscribe
    )
    linker.add_func(NAME, "push", [STRING, STRING], None, push)
    linker.add_func(NAME, "pull", [STRING], own("message-future"), pull)
