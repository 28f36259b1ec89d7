"""The microserving router: turns each user request into sub-request calls on engines.

``Router.translate_request(req)`` is the one method a strategy provides: an async
generator of OpenAI completion chunks (dicts) produced from ``prep_recv`` /
``remote_send`` / ``start_generate`` calls on ``self.engines``. ``Router.handle`` runs it
and starts it over when an engine answers ``preempt`` or dies (on the remaining engines).

    class MyRouter(Router):
        async def translate_request(self, req):
            ...  # any sequence of self.prep_recv / self.remote_send / self.start_generate
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx


class RouterError(Exception):
    """A request the engines refused for a reason retrying will not fix (a 4xx)."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class Preempted(Exception):
    """An engine could not take the request now; the whole strategy runs again."""


class EngineDown(Exception):
    def __init__(self, engine: Engine, why: str) -> None:
        super().__init__(f"engine {engine.url} is unreachable: {why}")
        self.engine = engine


@dataclass(eq=False)
class Engine:
    url: str
    index: int
    running: int = 0  # requests this router has in flight on it
    down_until: float = 0.0
    served: int = 0
    sent_bytes: int = 0

    @property
    def alive(self) -> bool:
        return time.monotonic() >= self.down_until


@dataclass
class RoutedRequest:
    """A user request as strategies see it: the prompt as tokens, one id for the three
    calls, and the sampling fields passed on to ``start_generate``."""

    prompt: list[int]
    request_id: str
    sampling: dict[str, Any] = field(default_factory=dict)
    attempt: int = 0
    # Filled in while it runs, for benchmarks and tests.
    transferred_bytes: int = 0
    prefill_engine: int | None = None
    decode_engine: int | None = None
    matched: int = 0


class Router:
    max_attempts = 4

    def __init__(self, engine_urls: list[str], timeout_s: float = 600.0) -> None:
        if not engine_urls:
            raise ValueError("a router needs at least one engine")
        self.engines = [Engine(u.rstrip("/"), i) for i, u in enumerate(engine_urls)]
        self.http = httpx.AsyncClient(timeout=timeout_s, limits=httpx.Limits(max_connections=256))
        self.retries = 0

    async def close(self) -> None:
        await self.http.aclose()

    # ----- what a strategy overrides -----

    async def translate_request(self, req: RoutedRequest) -> AsyncIterator[dict[str, Any]]:
        """Default: data parallel on the least-loaded engine."""
        async for chunk in self.start_generate(self.least_loaded(), req, begin=0):
            yield chunk

    # ----- the outer loop -----

    async def handle(self, req: RoutedRequest) -> AsyncIterator[dict[str, Any]]:
        """Run the strategy; on ``preempt`` or a dead engine start it over (nothing has
        reached the client yet in either case, or the error is passed on)."""
        while True:
            started = False
            try:
                async for chunk in self.translate_request(req):
                    started = True
                    yield chunk
                return
            except (Preempted, EngineDown) as e:
                if isinstance(e, EngineDown):
                    e.engine.down_until = time.monotonic() + 5.0
                if started or req.attempt + 1 >= self.max_attempts or not self.live_engines():
                    raise RouterError(
                        503, f"request failed after {req.attempt + 1} attempts: {e}", "unavailable"
                    ) from None
                req.attempt += 1
                self.retries += 1
                req.request_id = f"{req.request_id.split('#')[0]}#{req.attempt}"
                await asyncio.sleep(0.05 * req.attempt)

    # ----- engine choice -----

    def live_engines(self, among: list[Engine] | None = None) -> list[Engine]:
        return [e for e in (among or self.engines) if e.alive]

    def least_loaded(self, among: list[Engine] | None = None) -> Engine:
        live = self.live_engines(among)
        if not live:
            raise Preempted("no engine is up")
        return min(live, key=lambda e: (e.running, e.index))

    # ----- the three calls -----

    async def prep_recv(self, engine: Engine, req: RoutedRequest, end: int) -> tuple[str, int, str]:
        """Reserve KV slots for ``prompt[matched:end]`` on ``engine``: (address, matched,
        receiver's KV endpoint)."""
        r = await self._post(
            engine,
            "/microserving/prep_recv",
            {"prompt": req.prompt, "end": end, "request_id": req.request_id},
        )
        return str(r["kv_addr_info"]), int(r["prefix_matched_length"]), str(r["recv_engine"])

    async def remote_send(
        self,
        engine: Engine,
        req: RoutedRequest,
        begin: int,
        end: int,
        kv_addr_info: str,
        recv_engine: str,
    ) -> dict[str, Any]:
        """Compute ``prompt[:end]`` on ``engine`` and push ``[begin:end]`` to the receiver;
        returns once the receiver has it all."""
        engine.running += 1
        try:
            r = await self._post(
                engine,
                "/microserving/remote_send",
                {
                    "prompt": req.prompt,
                    "begin": begin,
                    "end": end,
                    "kv_addr_info": kv_addr_info,
                    "recv_engine": recv_engine,
                    "request_id": req.request_id,
                },
            )
        finally:
            engine.running -= 1
        req.transferred_bytes += int(r.get("bytes", 0))
        engine.sent_bytes += int(r.get("bytes", 0))
        return r

    async def start_generate(
        self, engine: Engine, req: RoutedRequest, begin: int
    ) -> AsyncIterator[dict[str, Any]]:
        """Generate on ``engine`` from ``prompt[begin:]`` on (its KV below ``begin`` came
        from ``prep_recv`` + ``remote_send``, or ``begin=0``): completion chunks."""
        body = {
            **req.sampling,
            "prompt": req.prompt,
            "begin": begin,
            "request_id": req.request_id,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        engine.running += 1
        req.decode_engine = engine.index
        try:
            async with self.http.stream(
                "POST", engine.url + "/microserving/start_generate", json=body
            ) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    self._raise(engine, resp)
                async for line in resp.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise RouterError(502, str(chunk["error"].get("message")), "engine_error")
                    if any(c.get("finish_reason") == "preempt" for c in chunk.get("choices", [])):
                        raise Preempted(f"engine {engine.url} preempted the request")
                    yield chunk
            engine.served += 1
        except httpx.TransportError as e:
            raise EngineDown(engine, str(e)) from None
        finally:
            engine.running -= 1

    async def abort(self, engine: Engine, req: RoutedRequest) -> None:
        """Drop ``req``'s reservation on ``engine`` (best effort: it also expires)."""
        with contextlib.suppress(Exception):
            await self.http.post(
                engine.url + "/microserving/abort", json={"request_id": req.request_id}, timeout=5
            )

    async def _post(self, engine: Engine, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            resp = await self.http.post(engine.url + path, json=body)
        except httpx.TransportError as e:
            raise EngineDown(engine, str(e)) from None
        if resp.status_code != 200:
            self._raise(engine, resp)
        return resp.json()  # type: ignore[no-any-return]

    @staticmethod
    def _raise(engine: Engine, resp: httpx.Response) -> None:
        try:
            err = resp.json().get("error", {})
        except ValueError:
            err = {}
        code, message = err.get("code"), err.get("message") or resp.text
        if code == "preempt" or resp.status_code == 503:
            raise Preempted(f"engine {engine.url}: {message}")
        raise RouterError(resp.status_code, f"engine {engine.url}: {message}", code)
