"""Children belong to their parent: an instance's children end with it (unless launched
detached), are listed with their parent by the server, and a launch the instance cap
refuses fails in the parent instead of reporting a child that never runs; the parent
waits for them and ends them."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

from tests.reliability.support import wait_for


def test_children_end_with_their_parent(rrt: Any, kit: str) -> None:
    parent = rrt.launch(kit, ["family", kit, "chan-a"])
    child_id = parent.recv(30)
    assert rrt.query(lambda: child_id in rrt.instances)
    child = rrt.query(lambda: rrt.instances[child_id].handle)
    parent.send("bye")
    assert parent.wait(30).ok and parent.recv(5) == "parent done: bye"
    end = child.wait(30)
    assert not end.ok and f"its parent {parent.id} ended" in (end.error or "")
    assert rrt.query(lambda: child_id not in rrt.instances)


def test_a_killed_parent_takes_its_children(rrt: Any, kit: str) -> None:
    parent = rrt.launch(kit, ["family", kit, "chan-b"])
    child_id = parent.recv(30)
    child = rrt.query(lambda: rrt.instances[child_id].handle)
    parent.kill()
    assert not parent.wait(30).ok
    assert not child.wait(30).ok


def test_a_launch_over_the_instance_cap_fails_in_the_parent(rrt: Any, kit: str) -> None:
    wait_for(lambda: rrt.query(lambda: len(rrt.instances)) == 0)
    saved = rrt.reconfigure(max_instances=1)
    try:
        end = rrt.launch(kit, ["family", kit, "chan-c"]).wait(30)
        assert not end.ok and "launch failed: too many instances" in (end.error or "")
    finally:
        rrt.reconfigure(saved)


def test_the_server_lists_children_and_terminates_them_with_the_parent(
    server: Any, sdkkit_wasm: bytes
) -> None:
    from loom.client import SyncClient

    with SyncClient(server.url) as client:
        program = client.upload(sdkkit_wasm)
        parent = client.launch(program, ["family", program, "chan-d"])
        child_id = parent.recv(30)
        wait_for(lambda: any(i["id"] == child_id for i in client.list()))
        listed = {i["id"]: i for i in client.list()}
        assert listed[child_id]["parent"] == parent.id
        assert not listed[child_id]["detached"]
        assert httpx.get(server.url + "/health", timeout=10).json()["instances"] == 2
        client.terminate(parent.id)
        wait_for(lambda: not client.list())  # the child went with it


def test_an_idle_instance_is_ended_but_one_waiting_on_the_engine_is_not(rrt: Any, kit: str) -> None:
    saved = rrt.reconfigure(idle_timeout_s=0.5)
    try:
        idle = rrt.launch(kit, ["channel", "pull-from", "nobody-pushes"])
        end = idle.wait(30)
        assert not end.ok and "idle for more than 0.5 s" in (end.error or "")
        # A host generation longer than the limit is work, not idleness.
        t0 = time.monotonic()
        busy = rrt.launch(kit, ["fast", "Once upon a time", "1500"])
        result = busy.wait(120)
        assert result.ok, result.error
        assert time.monotonic() - t0 > 1.0  # (it did outlast the limit)
    finally:
        rrt.reconfigure(saved)


def test_a_parent_waits_for_and_ends_its_children(rrt: Any, kit: str) -> None:
    h = rrt.launch(kit, ["join", kit])
    end = h.wait(60)
    assert end.ok, end.error
    out = json.loads(h.recv(5))
    assert out["ok"] == "ok"
    assert "boom from the app" in out["failed"]
    assert "ended by its parent" in out["killed"]
    assert "not a child of this instance" in out["stranger"]
