"""The microserving router: turns each user request into sub-request calls on engines.

``Router.translate_request(req)`` is the one method a strategy provides: an async
generator of OpenAI completion chunks (dicts) produced from ``prep_recv`` /
``remote_send`` / ``start_generate`` calls on ``self.engines``. ``Router.handle`` runs it
and starts it over when an engine answers ``preempt`` or dies (on the remaining engines),
even after text reached the client: the new run's text is checked against what was sent
and only the rest is passed on (a request without a seed gets one, so a sampled
generation replays the same tokens).

    class MyRouter(Router):
        async def translate_request(self, req):
            ...  # any sequence of self.prep_recv / self.remote_send / self.start_generate
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from loom.router.fleet import Engine, introduce, probe

__all__ = ["Engine", "EngineDown", "Preempted", "RoutedRequest", "Router", "RouterError"]


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

    def __init__(
        self, engine_urls: list[str], timeout_s: float = 600.0, api_key: str | None = None
    ) -> None:
        """``api_key``: sent on every call to the engines (engines with keys need it)."""
        if not engine_urls:
            raise ValueError("a router needs at least one engine")
        self.engines = [Engine(u.rstrip("/"), i) for i, u in enumerate(engine_urls)]
        self._next_index = len(self.engines)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(
            timeout=timeout_s, limits=httpx.Limits(max_connections=256), headers=headers
        )
        self.retries = 0
        self._probing: asyncio.Task[None] | None = None

    async def close(self) -> None:
        if self._probing is not None:
            self._probing.cancel()
        await self.http.aclose()

    # ----- the engines' health -----

    async def probe(self) -> None:
        """Ask every engine's ``/health`` now; a dead one leaves the choices."""
        await probe(self.http, self.engines)

    def start_probing(self, interval_s: float) -> None:
        """Probe every ``interval_s`` in the background (until ``close``)."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(interval_s)
                with contextlib.suppress(Exception):
                    await self.probe()

        if interval_s > 0 and self._probing is None:
            self._probing = asyncio.create_task(loop())

    # ----- engines joining and leaving -----

    def add_engine(self, url: str) -> Engine:
        """Route over the engine at ``url`` from now on (its index is new, never reused)."""
        url = url.rstrip("/")
        if any(e.url == url for e in self.engines):
            raise ValueError(f"engine {url} is already routed to")
        engine = Engine(url, self._next_index)
        self._next_index += 1
        self.engines.append(engine)
        return engine

    async def remove_engine(self, engine: Engine, drain_s: float = 60.0) -> None:
        """Stop sending ``engine`` new requests, wait (up to ``drain_s``) for those it has
        to finish, then forget it."""
        if engine.retiring:
            raise ValueError(f"engine {engine.url} is already being removed")
        if sum(not e.retiring for e in self.engines) <= 1:
            raise ValueError("a router needs at least one engine")
        engine.retiring = True
        deadline = asyncio.get_running_loop().time() + drain_s
        while engine.running and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        with contextlib.suppress(ValueError):
            self.engines.remove(engine)

    def engine(self, index: int) -> Engine | None:
        """The engine with this index (``None``: gone)."""
        return next((e for e in self.engines if e.index == index), None)

    # ----- what a strategy overrides -----

    async def translate_request(self, req: RoutedRequest) -> AsyncIterator[dict[str, Any]]:
        """Default: data parallel on the least-loaded engine."""
        async for chunk in self.start_generate(self.least_loaded(), req, begin=0):
            yield chunk

    # ----- the outer loop -----

    async def handle(self, req: RoutedRequest) -> AsyncIterator[dict[str, Any]]:
        """Run the strategy; on ``preempt`` or a dead engine start it over on the engines
        left, passing on only the text the client does not have yet."""
        if req.sampling.get("temperature", 1.0) != 0 and req.sampling.get("seed") is None:
            req.sampling["seed"] = random.getrandbits(63)  # a rerun samples the same tokens
        sent = ""  # text that reached the client
        while True:
            replay = sent  # what this run must reproduce before anything new goes out
            try:
                async for chunk in self.translate_request(req):
                    if replay:
                        chunk, replay = _unsent(chunk, replay)
                        if not chunk["choices"] and chunk.get("usage") is None:
                            continue  # all of it was sent before
                    sent += "".join(c.get("text") or "" for c in chunk.get("choices", []))
                    yield chunk
                return
            except (Preempted, EngineDown) as e:
                if isinstance(e, EngineDown):
                    e.engine.mark_down(str(e))
                if req.attempt + 1 >= self.max_attempts or not self.live_engines():
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
        await introduce(self.http, self.engines)  # engines send KV only to peers they know
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

    def _raise(self, engine: Engine, resp: httpx.Response) -> None:
        try:
            err = resp.json().get("error", {})
        except ValueError:
            err = {}
        code, message = err.get("code"), err.get("message") or resp.text
        if code == "unknown_peer":  # an engine restarted (new receiver) or forgot: again
            for e in self.engines:
                e.forget()
        # Worth another run: a full engine, a client over its reservation quota (its
        # reservations end soon), a transfer whose receiver died, a stale peer list.
        if code in ("preempt", "reservation_quota", "transfer_failed", "unknown_peer"):
            raise Preempted(f"engine {engine.url}: {message}")
        if resp.status_code == 503:
            raise Preempted(f"engine {engine.url}: {message}")
        if resp.status_code == 401:  # the client's key is fine; the router's is not
            message = f"the router's API key was refused (--engine-api-key): {message}"
            raise RouterError(502, f"engine {engine.url}: {message}", "engine_auth")
        raise RouterError(resp.status_code, f"engine {engine.url}: {message}", code)


def _unsent(chunk: dict[str, Any], replay: str) -> tuple[dict[str, Any], str]:
    """``chunk`` less the text the client already has (``replay``, which it must start
    or continue), and what of ``replay`` is left to match."""
    choices = []
    for c in chunk.get("choices", []):
        text = c.get("text") or ""
        n = min(len(text), len(replay))
        if text[:n] != replay[:n] or (c.get("finish_reason") and n < len(replay)):
            raise RouterError(503, "an engine died mid-answer and the rerun on another engine "
                                   "gave different text", "unavailable")  # fmt: skip
        replay = replay[n:]
        if text[n:] or c.get("finish_reason"):
            choices.append({**c, "text": text[n:]})
    return {**chunk, "choices": choices}, replay
