"""``POST /v1/inferlets/run``: launch an uploaded program and stream its events as SSE,
for clients that do not speak WebSocket."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from loom.api.errors import ApiError
from loom.server.auth import require_key
from loom.server.state import FINAL_EVENTS, Event, ServerState, event_size

router = APIRouter(dependencies=[Depends(require_key)])


class RunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    program: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of an uploaded program")
    args: list[str] = Field(default_factory=list)


@router.post("/v1/inferlets/run")
async def run_inferlet(body: RunRequest, request: Request) -> StreamingResponse:
    state: ServerState = request.app.state.loom
    if not await asyncio.to_thread(state.has_program, body.program):
        raise ApiError(404, f"no program with hash {body.program}; upload it first",
                       param="program", code="unknown_program", kind="not_found_error")  # fmt: skip
    if len(state.instances) >= state.config.runtime.max_instances:
        raise ApiError(503, "too many instances; try again later", kind="server_error")
    record = state.launch(body.program, body.args)
    events: asyncio.Queue[Event] = asyncio.Queue()
    unread = [0]  # bytes of the events queued for this client, as event_size counts them
    cap = state.config.server.client_outbox_mb << 20

    def put(event: Event) -> None:
        if unread[0] > cap:  # a client that does not read: end its stream (and instance)
            record.subscribers.pop(-id(events), None)
            event = {**event, "event": "error", "data": {
                "message": f"over {cap >> 20} MiB of events unread: disconnected"}}  # fmt: skip
        unread[0] += event_size(event)
        events.put_nowait(event)

    record.subscribers[-id(events)] = put

    async def stream() -> AsyncIterator[str]:
        finished = False
        try:
            yield _sse("launched", {"instance": record.id})
            while True:
                event = await events.get()
                unread[0] -= event_size(event)
                yield _sse(event["event"], event["data"])
                if event["event"] in FINAL_EVENTS:
                    finished = record.status != "running"  # (not a slow client's end)
                    return
        finally:
            record.subscribers.pop(-id(events), None)
            if not finished and record.status == "running":
                state.terminate(record)  # the client went away: nobody can read the output

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})  # fmt: skip


def _sse(kind: str, data: Any) -> str:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"
