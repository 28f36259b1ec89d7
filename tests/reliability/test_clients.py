"""What clients can make the server hold is bounded: a WebSocket client that leaves its
events unread is disconnected past ``--client-outbox-mb``, instance backlogs are held to
``--event-backlog-mb``, and an address that keeps failing authentication is refused for a
while (no key guessing at full speed)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
import websockets

from tests.reliability.support import wait_for

KEY = "reliability-key"


@pytest.fixture(scope="module")
def keyed(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from loom.config import ServeConfig
    from loom.server.app import BackgroundServer

    config = ServeConfig.of(model=str(tiny_dir), port=0, worker="thread", num_pages=64,
                            api_keys=[KEY], client_outbox_mb=1, auth_failures_per_minute=3,
                            program_dir=str(tmp_path_factory.mktemp("keyed-uploads")))  # fmt: skip
    with BackgroundServer(config) as srv:
        yield srv


def frame(**fields: Any) -> bytes:
    return msgpack.packb(fields)  # type: ignore[no-any-return]


def test_a_client_that_does_not_read_is_disconnected(keyed: Any) -> None:
    from loom.client import SyncClient
    from loom.sdk.build import build_inferlet

    guest = Path(__file__).parents[1] / "runtime" / "guests" / "testkit"
    with SyncClient(keyed.url, api_key=KEY) as client:
        program = client.upload(build_inferlet(guest, sdk=False).read_bytes())

    async def flood_unread() -> tuple[list[dict[str, Any]], int | None, str]:
        url = keyed.url.replace("http://", "ws://") + "/v1/ws"
        async with websockets.connect(url, max_size=None) as ws:
            await ws.send(frame(type="hello", id=0, version=1, api_key=KEY))
            await ws.recv()
            await ws.send(frame(type="launch", id=1, program=program, args=["flood"]))
            while (reply := msgpack.unpackb(await ws.recv()))["type"] != "ok":
                pass
            iid = reply["instance"]
            record = keyed.state.instances[iid]
            # Read nothing more: the server lets the client go instead of holding events.
            await asyncio.to_thread(wait_for, lambda: not record.subscribers, 60)
            frames = []
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    frames.append(msgpack.unpackb(await asyncio.wait_for(ws.recv(), 30)))
            return frames, ws.close_code, iid

    frames, code, iid = asyncio.run(flood_unread())
    assert code == 1008
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == "too_slow"
    # The instance's own backlog is held to its byte cap meanwhile (16 MiB); with nobody
    # reading, once it has sent that much again the instance is ended (not left to run
    # to its CPU budget).
    record = keyed.state.find(iid)
    assert record.backlog_bytes <= 16 << 20
    wait_for(lambda: record.status == "failed", 60)
    assert "dropped unread" in record.backlog[-1]["data"]["message"]
    with SyncClient(keyed.url, api_key=KEY) as client:
        wait_for(lambda: not client.list())


def test_a_flood_goes_at_its_readers_pace_and_the_server_answers_meanwhile(
    keyed: Any,
) -> None:
    from loom.client import SyncClient
    from loom.sdk.build import build_inferlet
    from loom.server.event_hop import HOP_EVENTS

    guest = Path(__file__).parents[1] / "runtime" / "guests" / "testkit"
    with SyncClient(keyed.url, api_key=KEY) as client:
        program = client.upload(build_inferlet(guest, sdk=False).read_bytes())
        flood = client.launch(program, ["flood"])
        slowest = 0.0
        for i in range(20_000):
            assert flood.recv(30) == "x" * 100
            if i % 2000 == 0:  # the loop is never a flood's backlog away from a request
                r = httpx.get(keyed.url + "/health", timeout=30)
                assert r.status_code == 200
                slowest = max(slowest, r.elapsed.total_seconds())
        hop = keyed.state.instances[flood.id].handle.listener
        # The sender paused whenever a batch's worth waited for the loop (a few messages
        # may go between the pause and its next time-slice check).
        assert HOP_EVENTS <= hop.peak <= HOP_EVENTS + 64
        assert slowest < 5.0
        flood.terminate()
        wait_for(lambda: not client.list())


def test_a_backlog_keeps_its_final_event_within_its_byte_cap() -> None:
    from loom.server.state import InstanceRecord

    record = InstanceRecord("i", "p", [], backlog_bytes_cap=4 << 20)
    for _ in range(20):
        record.emit("message", "m" * (1 << 20))
    record.emit("result", {"tokens": 1})
    assert record.backlog_bytes <= 4 << 20
    assert record.backlog[-1]["event"] == "result" and len(record.backlog) == 4


def test_repeated_failed_authentication_is_refused_for_a_while(keyed: Any) -> None:
    # (Last in this module: the address stays refused for a minute.)
    models = keyed.url + "/v1/models"
    for _ in range(3):
        r = httpx.get(models, headers={"Authorization": "Bearer guess"}, timeout=10)
        assert r.status_code == 401
    r = httpx.get(models, headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    assert "too many failed authentications" in r.json()["error"]["message"]

    async def hello() -> dict[str, Any]:
        url = keyed.url.replace("http://", "ws://") + "/v1/ws"
        async with websockets.connect(url) as ws:
            await ws.send(frame(type="hello", id=0, version=1, api_key=KEY))
            return msgpack.unpackb(await ws.recv())  # type: ignore[no-any-return]

    reply = asyncio.run(hello())
    assert reply["code"] == "unauthenticated" and "too many failed" in reply["message"]
    assert httpx.get(keyed.url + "/health", timeout=10).status_code == 200  # no key there
