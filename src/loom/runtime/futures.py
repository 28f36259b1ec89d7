"""Host-side futures behind the API's result resources, and the wait that suspends a guest.

A ``HostFuture`` is resolved once by the runtime thread. ``PollWait`` is what the async
``types.poll`` host function hands to wasmtime: the guest's fiber stays suspended until
one of its futures resolves, at which point the instance is put back on the run queue.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any


class HostFuture:
    __slots__ = ("done", "value", "waiters")

    def __init__(self) -> None:
        self.done = False
        self.value: Any = None
        self.waiters: list[Callable[[], None]] = []

    def resolve(self, value: Any) -> None:
        if self.done:
            return
        self.done, self.value = True, value
        waiters, self.waiters = self.waiters, []
        for wake in waiters:
            wake()


class Stream:
    """A future that resolves each time a message arrives (a subscription). ``size``:
    the characters of the messages waiting (a str of n characters holds at least n
    bytes), which the byte caps count."""

    __slots__ = ("items", "size", "waiters")

    def __init__(self) -> None:
        self.items: deque[str] = deque()
        self.size = 0
        self.waiters: list[Callable[[], None]] = []

    @property
    def done(self) -> bool:
        return bool(self.items)

    def put(self, item: str) -> None:
        self.items.append(item)
        self.size += len(item)
        waiters, self.waiters = self.waiters, []
        for wake in waiters:
            wake()

    def pop(self) -> str | None:
        """The oldest waiting message (taken), or None."""
        if not self.items:
            return None
        item = self.items.popleft()
        self.size -= len(item)
        return item


Waitable = HostFuture | Stream


class Take(HostFuture):
    """A pending ``take`` of a ``Mailbox``. Dropped unresolved (its handle dropped, its
    instance ended) it is withdrawn: no message is handed to a reader that is gone."""

    __slots__ = ()

    def withdraw(self) -> None:
        if not self.done:
            self.done = True
            self.waiters = []


class Mailbox:
    """Messages for one receiver, delivered to its pending ``take`` futures in order."""

    __slots__ = ("messages", "size", "takers")

    def __init__(self) -> None:
        self.messages: deque[str] = deque()
        self.size = 0  # characters of the messages waiting (as ``Stream.size``)
        self.takers: deque[Take] = deque()

    def deliver(self, message: str) -> None:
        while self.takers:
            fut = self.takers.popleft()
            if not fut.done:
                fut.resolve(message)
                return
        self.messages.append(message)
        self.size += len(message)

    def take(self) -> Take:
        fut = Take()
        if self.messages:
            message = self.messages.popleft()
            self.size -= len(message)
            fut.resolve(message)
        else:
            takers = self.takers
            while takers and takers[0].done:  # withdrawn ones: let them go
                takers.popleft()
            takers.append(fut)
        return fut

    def __len__(self) -> int:
        return len(self.messages)


class PollWait:
    """The pending result of ``poll(pollables)``: indices of the ready ones."""

    __slots__ = ("futures", "woken")

    def __init__(self, futures: list[Waitable], wake: Callable[[], None]) -> None:
        self.futures = futures
        self.woken = False
        if not self.ready():
            for f in futures:
                f.waiters.append(wake)

    def ready(self) -> bool:
        futures = self.futures
        if len(futures) == 1:  # the common wait: one pass's result
            return bool(futures[0].done)
        return any(f.done for f in futures)

    def value(self) -> list[int]:
        futures = self.futures
        if len(futures) == 1:
            return [0] if futures[0].done else []
        return [i for i, f in enumerate(futures) if f.done]
