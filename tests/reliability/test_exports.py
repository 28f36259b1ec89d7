"""Exports have owners and a quota: only the exporter (or, for a persistent export whose
exporter ended, an instance of its program) unexports it, and one program's persistent
exports cannot hold more than their share of the KV pool."""

from __future__ import annotations

import json
from typing import Any

from tests.reliability.support import complete


def test_only_the_owner_unexports(rrt: Any, testkit: str) -> None:
    owner = rrt.launch(testkit, ["export", "mine", "plain", "wait"])
    assert owner.recv(30) == "exported"
    thief = rrt.launch(testkit, ["unexport", "mine"]).wait(30)
    assert not thief.ok and "belongs to another inferlet" in (thief.error or "")
    assert rrt.query(lambda: "mine" in rrt.exports.exports)
    owner.send("done")
    assert owner.wait(30).ok
    assert rrt.query(lambda: "mine" not in rrt.exports.exports)  # a plain one ends with it


def test_a_persistent_export_is_removed_by_its_program(rrt: Any, testkit: str) -> None:
    assert rrt.launch(testkit, ["export", "kept", "persistent"]).wait(30).ok
    h = rrt.launch(testkit, ["unexport", "kept"])
    assert h.wait(30).ok and h.recv(5) == "unexported"
    assert rrt.query(lambda: "kept" not in rrt.exports.exports)


def test_persistent_exports_are_held_to_their_share_of_the_pool(rrt: Any, testkit: str) -> None:
    free0 = rrt.query(lambda: rrt.pool.num_available())
    saved = rrt.reconfigure(max_export_share=3 / rrt.pool.num_pages)  # 3 pages
    try:
        assert rrt.launch(testkit, ["export", "first", "persistent"]).wait(30).ok  # 2 pages
        end = rrt.launch(testkit, ["export", "second", "persistent"]).wait(30)
        assert not end.ok and "persistent exports would hold 4" in (end.error or "")
        assert rrt.query(lambda: "second" not in rrt.exports.exports)
    finally:
        rrt.reconfigure(saved)
        h = rrt.launch(testkit, ["unexport", "first"])
        assert h.wait(30).ok
    assert rrt.query(lambda: rrt.pool.num_available()) == free0


def test_an_export_hoard_leaves_room_for_completions(rrt: Any, testkit: str) -> None:
    names = []
    for i in range(rrt.pool.num_pages):  # export until the quota refuses
        end = rrt.launch(testkit, ["export", f"hoard-{i}", "persistent"]).wait(30)
        if not end.ok:
            assert "persistent exports would hold" in (end.error or "")
            break
        names.append(f"hoard-{i}")
    assert names and len(names) < rrt.pool.num_pages // 2
    done, box = complete(rrt, 32)
    assert done.wait(60) and box[0].error is None and len(box[0].tokens) == 32
    for name in names:
        assert rrt.launch(testkit, ["unexport", name]).wait(30).ok


PROMPT = "a prompt that spans more than one page of the KV cache"


def test_only_the_exporters_program_imports_until_it_publishes(
    rrt: Any, testkit: str, kit: str
) -> None:
    assert rrt.launch(kit, ["export", PROMPT, "sdk-private"]).wait(60).ok
    assert rrt.launch(kit, ["export", PROMPT, "sdk-public", "public"]).wait(60).ok
    try:
        # Another program neither imports nor lists the private export...
        end = rrt.launch(testkit, ["import", "sdk-private"]).wait(30)
        assert not end.ok and "another program's, not published" in (end.error or "")
        assert rrt.query(lambda: rrt.exports.listing(testkit)) == [("sdk-public", 2)]
        # ...the exporter's program does, and everyone imports the published one.
        assert rrt.launch(kit, ["import", "sdk-private"]).wait(60).ok
        h = rrt.launch(testkit, ["import", "sdk-public"])
        assert h.wait(30).ok and json.loads(h.recv(5))["pages"] == 2
    finally:
        rrt.query(lambda: [rrt.exports.remove(n) for n in ("sdk-private", "sdk-public")])


def test_store_values_are_held_to_a_quota_per_program(rrt: Any, testkit: str) -> None:
    saved = rrt.reconfigure(store_quota_mb=1)
    store, big = rrt.messaging.store_kv, "x" * 400_000
    used0 = rrt.query(lambda: store.used(testkit))  # keys earlier tests left
    try:
        for i in range(2):
            assert rrt.launch(testkit, ["put", f"big-{i}", big]).wait(30).ok
        end = rrt.launch(testkit, ["put", "big-2", big]).wait(30)
        assert not end.ok and "values would take" in (end.error or "")
        assert rrt.query(lambda: "big-2" not in store and store.used(testkit)) == used0 + 800_010
        # Overwriting a key gives its old bytes back first.
        assert rrt.launch(testkit, ["put", "big-1", big]).wait(30).ok
    finally:
        rrt.query(lambda: [store.pop(f"big-{i}") for i in range(3)])
        rrt.reconfigure(saved)
    assert rrt.query(lambda: store.used(testkit)) == used0
