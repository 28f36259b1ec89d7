"""A blocking wrapper over ``Client``: its event loop runs in a background thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Coroutine, Iterator
from typing import Any, TypeVar

from loom.client.client import Client, Instance, InstanceStatus

T = TypeVar("T")


class SyncInstance:
    def __init__(self, client: SyncClient, inst: Instance) -> None:
        self._client, self._inst = client, inst
        self.id = inst.id

    def send(self, text: str) -> None:
        self._client._run(self._inst.send(text))

    def recv(self, timeout: float | None = None) -> str:
        return self._client._run(self._inst.recv(), timeout)

    def wait(self, timeout: float | None = None) -> InstanceStatus:
        return self._client._run(self._inst.wait(), timeout)

    def terminate(self) -> None:
        self._client._run(self._inst.terminate())

    def events(self) -> Iterator[dict[str, Any]]:
        it = self._inst.events().__aiter__()
        while True:
            try:
                yield self._client._run(_await(it.__anext__()))
            except StopAsyncIteration:
                return


async def _await(awaitable: Awaitable[T]) -> T:
    return await awaitable


class SyncClient:
    """``with SyncClient("http://127.0.0.1:8080") as c: inst = c.launch(c.upload(wasm))``"""

    def __init__(self, url: str, api_key: str | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._client: Client = self._run(Client.connect(url, api_key))

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def upload(self, wasm: bytes) -> str:
        return self._run(self._client.upload(wasm))

    def has_program(self, digest: str) -> bool:
        return self._run(self._client.has_program(digest))

    def launch(self, program: str, args: list[str] | None = None) -> SyncInstance:
        return SyncInstance(self, self._run(self._client.launch(program, args)))

    def attach(self, instance_id: str) -> SyncInstance:
        return SyncInstance(self, self._run(self._client.attach(instance_id)))

    def list(self) -> list[dict[str, Any]]:
        return self._run(self._client.list())

    def terminate(self, instance_id: str) -> None:
        self._run(self._client.terminate(instance_id))

    def close(self) -> None:
        try:
            self._run(self._client.close(), timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
