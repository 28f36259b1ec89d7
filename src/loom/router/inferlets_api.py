"""Inferlets through the router: the engines behind it are whole ``loom serve`` replicas,
so programs run on them too.

``POST /v1/programs`` (the program's bytes) uploads a program to every live replica and
keeps it, so that a replica added or restarted later gets it on its first launch.
``POST /v1/inferlets/run`` (``{"program": sha256, "args": [...]}``, as on a replica)
launches it on the least-loaded replica and relays the instance's events (SSE).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from loom.api.errors import ApiError
from loom.router.fleet import Engine
from loom.router.router import Router

MAX_PROGRAM_BYTES = 64 << 20


class RunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    program: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of an uploaded program")
    args: list[str] = Field(default_factory=list)


class ProgramStore:
    """Programs uploaded through the router (sha256 -> bytes), and putting them on
    replicas over the replicas' own protocol."""

    def __init__(self, api_key: str | None) -> None:
        self.programs: dict[str, bytes] = {}
        self.api_key = api_key

    async def put_on(self, engine: Engine, digest: str) -> None:
        from loom.client import Client

        async with await Client.connect(engine.url, api_key=self.api_key) as client:
            await client.upload(self.programs[digest])

    async def publish(self, router: Router, wasm: bytes) -> tuple[str, int, dict[str, str]]:
        """Keep ``wasm`` and put it on every live engine: (its hash, how many took it, why
        the others did not). ``ValueError`` when none took it (or none is up)."""
        digest = hashlib.sha256(wasm).hexdigest()
        live = router.live_engines()
        if not live:
            raise ValueError("no replica is up")
        self.programs[digest] = wasm
        results = await asyncio.gather(*(self.put_on(e, digest) for e in live),
                                       return_exceptions=True)  # fmt: skip
        failed = {e.url: str(r) for e, r in zip(live, results, strict=True)
                  if isinstance(r, BaseException)}  # fmt: skip
        if len(failed) == len(live):
            del self.programs[digest]
            raise ValueError(f"no replica took the program: {next(iter(failed.values()))}")
        return digest, len(live) - len(failed), failed


def inferlet_routes(router: Router, store: ProgramStore, guard: list[Any]) -> APIRouter:
    routes = APIRouter(dependencies=guard)

    @routes.post("/v1/programs")
    async def upload(request: Request) -> dict[str, Any]:
        wasm = await request.body()
        if not 0 < len(wasm) <= MAX_PROGRAM_BYTES:
            raise ApiError(413 if wasm else 400,
                           f"a program is 1..{MAX_PROGRAM_BYTES} bytes (the body)")  # fmt: skip
        try:
            digest, took, failed = await store.publish(router, wasm)
        except ValueError as e:
            raise ApiError(400, str(e), param="body", code="bad_program") from None
        return {"program": digest, "replicas": took, "failed": failed}

    @routes.post("/v1/inferlets/run")
    async def run(body: RunRequest) -> StreamingResponse:
        if body.program not in store.programs:
            raise ApiError(404, f"no program with hash {body.program}; upload it first "
                           "(POST /v1/programs)", param="program", code="unknown_program",
                           kind="not_found_error")  # fmt: skip
        for _ in range(router.max_attempts):
            if not router.live_engines():
                break
            engine = router.least_loaded()
            engine.running += 1  # now: launches at once must not all pick the same one
            try:
                resp = await _launch(router, engine, body)
                if resp.status_code == 404:  # a replica that joined or restarted since
                    await resp.aclose()
                    await store.put_on(engine, body.program)
                    resp = await _launch(router, engine, body)
            except Exception as e:  # unreachable, or its protocol refused the upload
                engine.running -= 1
                engine.mark_down(f"cannot launch there: {str(e) or type(e).__name__}")
                continue
            if resp.status_code != 200:
                engine.running -= 1
                text = (await resp.aread()).decode(errors="replace")
                await resp.aclose()
                if resp.status_code == 503:  # full: another replica may take it
                    continue
                raise ApiError(resp.status_code, f"replica {engine.url}: {text[:500]}")
            return StreamingResponse(_relay(engine, resp), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})  # fmt: skip
        raise ApiError(503, "no replica could launch the program", kind="server_error")

    return routes


async def _launch(router: Router, engine: Engine, body: RunRequest) -> httpx.Response:
    req = router.http.build_request("POST", engine.url + "/v1/inferlets/run",
                                    json=body.model_dump())  # fmt: skip
    return await router.http.send(req, stream=True)


async def _relay(engine: Engine, resp: httpx.Response) -> AsyncIterator[bytes]:
    """The replica's event stream as it comes; the instance counts as the replica's load
    until it ends."""
    try:
        async for part in resp.aiter_raw():
            yield part
    finally:
        engine.running -= 1
        await resp.aclose()
