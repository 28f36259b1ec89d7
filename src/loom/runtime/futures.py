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
    """A future that resolves each time an item arrives (messages, subscriptions)."""

    __slots__ = ("items", "waiters")

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.waiters: list[Callable[[], None]] = []

    @property
    def done(self) -> bool:
        return bool(self.items)

    def put(self, item: Any) -> None:
        self.items.append(item)
        waiters, self.waiters = self.waiters, []
        for wake in waiters:
            wake()


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

    __slots__ = ("messages", "takers")

    def __init__(self) -> None:
        self.messages: deque[str] = deque()
        self.takers: deque[Take] = deque()

    def deliver(self, message: str) -> None:
        while self.takers:
            fut = self.takers.popleft()
            if not fut.done:
                fut.resolve(message)
                return
        self.messages.append(message)

    def take(self) -> Take:
        fut = Take()
        if self.messages:
            fut.resolve(self.messages.popleft())
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
