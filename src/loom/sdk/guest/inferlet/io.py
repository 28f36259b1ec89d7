"""Talking to the outside: the client, other inferlets, the store, HTTP, child inferlets."""

from __future__ import annotations

from inferlet._loop import wait_for
from inferlet._wit import Err, http, messaging, runtime, store, unwrap
from inferlet._wit import log as wit_log


def get_arguments() -> list[str]:
    """The arguments the client launched this inferlet with."""
    return list(runtime.arguments())


def instance_id() -> str:
    return str(runtime.instance_id())


def send(message: str) -> None:
    """Send a message to the client."""
    messaging.send(str(message))


async def receive() -> str:
    """The next message from the client."""
    return await wait_for(messaging.receive())  # type: ignore[no-any-return]


def broadcast(topic: str, message: str) -> None:
    """Publish to every inferlet subscribed to ``topic``."""
    messaging.broadcast(topic, message)


class Subscription:
    """Messages broadcast on a topic from the moment of subscribing (``async for``)."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self._sub = messaging.subscribe(topic)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> str:
        return str(await wait_for(self._sub))

    def close(self) -> None:
        self._sub.unsubscribe()


def subscribe(topic: str) -> Subscription:
    """Subscribe now; iterate the returned object for the messages."""
    return Subscription(topic)


def push(channel: str, message: str) -> None:
    """Put a message on a channel; one ``pull`` takes it."""
    messaging.push(channel, message)


async def pull(channel: str) -> str:
    return await wait_for(messaging.pull(channel))  # type: ignore[no-any-return]


def store_get(key: str) -> str | None:
    value = store.get(key)
    return None if value is None else str(value)


def store_set(key: str, value: str) -> None:
    store.set(key, value)


def store_delete(key: str) -> None:
    store.delete(key)


def store_list() -> list[str]:
    return list(store.list_keys())


class Response:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.headers = dict(headers)
        self.body = body

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


async def http_request(
    method: str, url: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> Response:
    """An HTTP request, allowed only to hosts the server's policy names."""
    fut = http.fetch(method, url, list((headers or {}).items()), body)
    r = unwrap(await wait_for(fut))
    return Response(r.status, list(r.headers), bytes(r.body))


async def http_get(url: str, headers: dict[str, str] | None = None) -> Response:
    return await http_request("GET", url, b"", headers)


async def http_post(url: str, body: bytes | str, headers: dict[str, str] | None = None) -> Response:
    data = body.encode() if isinstance(body, str) else body
    return await http_request("POST", url, data, headers)


class Child(str):
    """A child inferlet: its instance id (a ``str``), which can also be waited on or
    ended from the inferlet that launched it."""

    async def wait(self) -> None:
        """Wait for the child to end; ``RuntimeError`` saying why when it failed or was
        ended."""
        try:
            end = runtime.wait_child(str(self))
        except Err as e:
            raise RuntimeError(e.value) from None
        outcome = await wait_for(end)
        if type(outcome).__name__ == "Err":
            raise RuntimeError(f"child {self} failed: {outcome.value}")

    def kill(self) -> None:
        """End the child now (nothing when it has ended already)."""
        try:
            runtime.kill_child(str(self))
        except Err as e:
            raise RuntimeError(e.value) from None


async def launch(program: str, args: list[str], detached: bool = False) -> Child:
    """Start a child inferlet from a program the server holds (by hash). The child ends
    when this inferlet ends, unless ``detached``; ``await child.wait()`` waits for its end,
    ``child.kill()`` ends it. Raises ``RuntimeError`` when the server refuses it (no such
    program, too many instances)."""
    start = runtime.launch_detached if detached else runtime.launch
    try:
        return Child(start(program, list(args)))
    except Err as e:
        raise RuntimeError(f"launch failed: {e.value}") from None


def log(*parts: object, level: str = "info") -> None:
    """A line in the server's log (``level``: debug, info, warning, error)."""
    wit_log.log(wit_log.Level[level.upper()], " ".join(str(p) for p in parts))
