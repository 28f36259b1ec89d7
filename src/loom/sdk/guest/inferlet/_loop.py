"""The inferlet's event loop: coroutines over host futures, one suspension for all.

Inside an inferlet there are no threads and no sockets, so ``asyncio`` has nothing to
drive. This loop runs every runnable task until each one waits on a host future (a
forward pass, a message...), then makes one ``poll`` call naming all of them: the
instance sleeps in the host until at least one is ready. Everything a set of tasks
submits before that call rides the same engine step, which is what ``gather`` over
sibling contexts relies on.

Pure Python: the host's ``poll`` is passed in, so the loop runs natively in tests.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class HostFuture(Protocol):
    """A binding's future resource: a pollable id, and ``get()`` (None until ready)."""

    def pollable(self) -> int: ...

    def get(self) -> Any: ...


class _HostWait:
    """``await`` on this suspends the task until the host future has a value."""

    __slots__ = ("fut",)

    def __init__(self, fut: HostFuture) -> None:
        self.fut = fut

    def __await__(self) -> Generator[Any, Any, Any]:
        value = yield self
        return value


class _Yield:
    """``await`` on this lets every other runnable task run first."""

    def __await__(self) -> Generator[Any, Any, None]:
        yield self


class Task:
    """A coroutine scheduled on the loop; ``await`` it for its result."""

    __slots__ = ("coro", "done", "error", "result", "waiters")

    def __init__(self, coro: Coroutine[Any, Any, Any]) -> None:
        self.coro = coro
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None
        self.waiters: list[Task | _AnyOf] = []

    def __await__(self) -> Generator[Any, Any, Any]:
        if not self.done:
            yield self
        if self.error is not None:
            raise self.error
        return self.result


class _AnyOf:
    """``await`` on this suspends the task until one of ``tasks`` is done."""

    __slots__ = ("fired", "task", "tasks")

    def __init__(self, tasks: list[Task]) -> None:
        self.tasks = tasks
        self.task: Task | None = None  # the waiting task, once it waits
        self.fired = False

    def __await__(self) -> Generator[Any, Any, None]:
        if not any(t.done for t in self.tasks):
            yield self


class Loop:
    def __init__(self, poll: Callable[[list[int]], list[int]]) -> None:
        self._poll = poll
        # (task, value to send, exception to throw)
        self._ready: deque[tuple[Task, Any, BaseException | None]] = deque()
        self._waiting: list[tuple[Task, HostFuture, int]] = []
        self.polls = 0  # host poll calls made (tests and statistics)

    def spawn(self, coro: Coroutine[Any, Any, T]) -> Task:
        task = Task(coro)
        self._ready.append((task, None, None))
        return task

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` (and every task it spawns) until it returns; its result."""
        main = self.spawn(coro)
        while not main.done:
            while self._ready and not main.done:
                task, value, error = self._ready.popleft()
                self._step(task, value, error)
            if main.done:
                break
            if not self._waiting:
                raise RuntimeError("deadlock: every task waits on another task")
            self._wait_host()
        if main.error is not None:
            raise main.error
        return main.result  # type: ignore[no-any-return]

    def _step(self, task: Task, value: Any, error: BaseException | None) -> None:
        try:
            yielded = task.coro.throw(error) if error is not None else task.coro.send(value)
        except StopIteration as stop:
            self._finish(task, stop.value, None)
            return
        except BaseException as e:  # the task failed: its awaiters get the exception
            self._finish(task, None, e)
            return
        if isinstance(yielded, _HostWait):
            self._waiting.append((task, yielded.fut, yielded.fut.pollable()))
        elif isinstance(yielded, Task):
            if yielded.done:
                self._ready.append((task, None, None))
            else:
                yielded.waiters.append(task)
        elif isinstance(yielded, _AnyOf):
            if any(t.done for t in yielded.tasks):
                self._ready.append((task, None, None))
            else:
                yielded.task = task
                for t in yielded.tasks:
                    t.waiters.append(yielded)
        elif isinstance(yielded, _Yield):
            self._ready.append((task, None, None))
        else:
            self._ready.append(
                (task, None, TypeError(f"inferlet tasks can only await SDK objects: {yielded!r}"))
            )

    def alone(self) -> bool:
        """No other task could run before the running one waits: none is ready or waits
        on the host (the rest, if any, wait on tasks). The running task may then block the
        whole instance in one host call instead of suspending through ``poll``."""
        return not self._ready and not self._waiting

    def _finish(self, task: Task, result: Any, error: BaseException | None) -> None:
        task.done, task.result, task.error = True, result, error
        for waiter in task.waiters:
            if isinstance(waiter, _AnyOf):  # woken once, by the first of its tasks
                if waiter.fired or waiter.task is None:
                    continue
                waiter.fired = True
                waiter = waiter.task
            self._ready.append((waiter, None, None))
        task.waiters.clear()

    def _wait_host(self) -> None:
        ready = set(self._poll([pid for _, _, pid in self._waiting]))
        self.polls += 1
        still: list[tuple[Task, HostFuture, int]] = []
        for i, entry in enumerate(self._waiting):
            if i not in ready:
                still.append(entry)
                continue
            task, fut, _ = entry
            value = fut.get()
            if value is None:  # a stream whose message another reader took: wait again
                still.append(entry)
            else:
                self._ready.append((task, value, None))
        self._waiting = still


_current: Loop | None = None


def run(coro: Coroutine[Any, Any, T], poll: Callable[[list[int]], list[int]]) -> T:
    """Run ``coro`` on a new loop that suspends with ``poll``."""
    global _current
    loop = Loop(poll)
    _current = loop
    try:
        return loop.run(coro)
    finally:
        _current = None


def current_loop() -> Loop:
    if _current is None:
        raise RuntimeError("no inferlet loop is running (call this from within main())")
    return _current


def alone() -> bool:
    """``Loop.alone`` of the running loop (False outside one: natively, in tests)."""
    return _current is not None and _current.alone()


def wait_for(fut: HostFuture) -> _HostWait:
    """An awaitable for a binding's future resource."""
    return _HostWait(fut)


def spawn(coro: Coroutine[Any, Any, T]) -> Task:
    """Schedule ``coro`` to run concurrently; ``await`` the task for its result."""
    return current_loop().spawn(coro)


async def gather(*aws: Awaitable[Any]) -> list[Any]:
    """Run the awaitables concurrently; their results in order.

    Every coroutine is started before any is awaited, so work they submit before their
    first wait (forward passes of sibling contexts) is queued together. The first
    failure is raised as soon as it happens (the others go on running), so a task that
    waits on a failed sibling (a message it would have sent) cannot hang the caller.
    """
    tasks = [
        a if isinstance(a, Task) else spawn(a if isinstance(a, Coroutine) else _as_coro(a))
        for a in aws
    ]
    pending = tasks
    while True:
        for t in tasks:
            if t.done and t.error is not None:
                raise t.error
        pending = [t for t in pending if not t.done]
        if not pending:
            return [t.result for t in tasks]
        await _AnyOf(pending)


async def _as_coro(a: Awaitable[T]) -> T:
    return await a


def yield_now() -> _Yield:
    """``await yield_now()`` lets the other tasks run first."""
    return _Yield()
