"""No message goes to an instance that is gone: a pull left pending by an instance that
ended (or whose handle was dropped) is withdrawn, and the next push reaches a live reader."""

from __future__ import annotations

from typing import Any

from tests.reliability.support import wait_for


def pending_pulls(rt: Any, channel: str) -> int:
    def count() -> int:
        box = rt.messaging.channels.get(channel)
        return 0 if box is None else sum(not t.done for t in box.takers)

    return rt.query(count)  # type: ignore[no-any-return]


def test_a_push_after_a_killed_puller_reaches_the_next_reader(rrt: Any, kit: str) -> None:
    dead = rrt.launch(kit, ["channel", "pull"])
    wait_for(lambda: pending_pulls(rrt, "jobs") == 1)
    dead.kill()
    assert not dead.wait(30).ok
    assert pending_pulls(rrt, "jobs") == 0  # its pull went with it
    assert rrt.launch(kit, ["channel", "push", "job-1"]).wait(30).ok
    live = rrt.launch(kit, ["channel", "pull"])
    result = live.wait(30)
    assert result.ok, result.error
    assert live.recv(5) == "pulled job-1"


def test_an_ended_puller_keeps_no_message_and_no_memory(rrt: Any, kit: str) -> None:
    # Several pullers come and go; the messages pushed after are all still there.
    for _ in range(3):
        h = rrt.launch(kit, ["channel", "pull"])
        wait_for(lambda: pending_pulls(rrt, "jobs") == 1)
        h.kill()
        h.wait(30)
    for i in range(3):
        assert rrt.launch(kit, ["channel", "push", f"m{i}"]).wait(30).ok
    box = rrt.query(lambda: rrt.messaging.channels["jobs"])
    assert list(box.messages) == ["m0", "m1", "m2"]
    assert not box.takers  # withdrawn takers were let go when the messages came
    got = []
    for _ in range(3):
        h = rrt.launch(kit, ["channel", "pull"])
        assert h.wait(30).ok
        got.append(h.recv(5))
    assert got == ["pulled m0", "pulled m1", "pulled m2"]


BIG = "x" * 400_000  # three of them are over a 1 MiB cap


def test_unread_messages_are_held_to_a_byte_cap(rrt: Any, kit: str) -> None:
    saved = rrt.reconfigure(max_pending_mb=1)
    try:
        # A channel nobody pulls from: the third big push is refused.
        for _ in range(2):
            assert rrt.launch(kit, ["channel", "push-to", "big-chan", BIG]).wait(30).ok
        end = rrt.launch(kit, ["channel", "push-to", "big-chan", BIG]).wait(30)
        assert not end.ok and "too many unread messages" in (end.error or "")
        assert rrt.query(lambda: rrt.messaging.channels["big-chan"].size) == 800_000
        # An instance that never reads its client's messages is ended past the cap.
        deaf = rrt.launch(kit, ["channel", "pull-from", "nobody-pushes-here"])
        wait_for(lambda: pending_pulls(rrt, "nobody-pushes-here") == 1)
        for _ in range(3):
            deaf.send(BIG)
        end = deaf.wait(30)
        assert not end.ok and "1 MiB from its client unread" in (end.error or "")
    finally:
        rrt.reconfigure(saved)
        rrt.query(lambda: rrt.messaging.channels.pop("big-chan", None))


def test_subscriptions_are_capped_per_instance(rrt: Any, testkit: str) -> None:
    saved = rrt.reconfigure(max_subscriptions=300)
    try:
        h = rrt.launch(testkit, ["subscribe-flood"])
        end = h.wait(30)
        assert not end.ok and "more than 300 subscriptions" in (end.error or "")
        assert [h.recv(5) for _ in range(3)] == ["100", "200", "300"]
        assert rrt.query(lambda: "flood-topic" not in rrt.messaging.topics)  # went with it
    finally:
        rrt.reconfigure(saved)
