"""Firing decisions of the batching policies (pure logic, no engine)."""

from __future__ import annotations

from loom.config import RuntimeConfig
from loom.runtime.batcher import Batcher
from loom.runtime.commands import CommandQueue, ForwardCmd
from loom.runtime.futures import HostFuture


def _queues(n: int, submitted_at: float) -> list[CommandQueue]:
    qs = []
    for i in range(n):
        q = CommandQueue(owner=i)
        q.push(ForwardCmd([1], [0], [i], 1, None, [], HostFuture(), submitted_at))
        qs.append(q)
    return qs


def _decide(policy: str, n: int, *, waited_ms: float, idle: bool, busy: bool = False) -> bool:
    b = Batcher(RuntimeConfig(batch_policy=policy, batch_k=4, batch_t_ms=10.0))  # type: ignore[arg-type]
    heads = _queues(n, submitted_at=100.0)
    return b.decide(busy, heads, 100.0 + waited_ms / 1000, guests_idle=idle).fire


def test_adaptive_fires_whenever_the_engine_is_free() -> None:
    assert _decide("adaptive", 1, waited_ms=0, idle=False)
    assert not _decide("adaptive", 8, waited_ms=50, idle=True, busy=True)


def test_adaptive_lets_woken_guests_join_a_decode_batch() -> None:
    """Asked before the guests run: 4 decode steps wait while 28 guests are runnable whose
    turns (28 x 0.5 ms) take less than an engine step (30 ms), so the batch waits for
    them (one batch of 32, not cohorts of 4 and 28). It fires at once when the turns
    would outlast the step, for a prefill that outweighs the runnable guests, and when
    asked after the guests ran."""
    b = Batcher(RuntimeConfig())

    def fire(heads: list[CommandQueue], runnable: int, turn_s: float = 0.0005) -> bool:
        return b.decide(
            False, heads, 100.0, guests_idle=False, runnable_before_guests=runnable,
            guest_turn_s=turn_s, engine_step_s=0.030,
        ).fire  # fmt: skip

    decode = _queues(4, submitted_at=100.0)
    assert not fire(decode, 28)
    assert fire(decode, 3)
    assert fire(decode, 28, turn_s=0.002)  # 56 ms of guest turns > a 30 ms step
    assert fire(decode, 0)  # asked after the guests
    prefill = CommandQueue(owner=9)
    prefill.push(ForwardCmd(list(range(40)), list(range(40)), [9], 8, None, [], HostFuture()))
    assert fire([prefill], 28)


def test_passes_ahead_fire_at_once_and_only_once_their_token_is_known() -> None:
    """A pass ahead (step-chain) is not ready while the pass it follows runs; once that
    returned, the batch fires with it at once even though the guests it woke are
    runnable: their turns run while the engine computes."""
    b = Batcher(RuntimeConfig())
    ahead = _queues(32, submitted_at=100.0)
    sources = []
    for q in ahead:
        cmd = q.peek()
        assert isinstance(cmd, ForwardCmd)
        cmd.is_ahead = True
        cmd.ahead_of = ForwardCmd([1], [0], [0], 1, None, [], HostFuture())
        sources.append(cmd.ahead_of)
    assert b.ready_heads() == []
    for q in ahead:
        b.add_queue(q)
    assert b.ready_heads() == []  # their tokens are not known yet
    for src in sources:
        src.future.resolve(7)
    heads = b.ready_heads()
    assert len(heads) == 32
    fire = b.decide(
        False, heads, 100.0, guests_idle=False, runnable_before_guests=32,
        guest_turn_s=0.0005, engine_step_s=0.030,
    ).fire  # fmt: skip
    assert fire
    plain = _queues(32, submitted_at=100.0)  # the same without passes ahead: held
    assert not b.decide(
        False, plain, 100.0, guests_idle=False, runnable_before_guests=32,
        guest_turn_s=0.0005, engine_step_s=0.030,
    ).fire  # fmt: skip


def test_k_waits_for_k_commands_or_for_every_guest_to_wait() -> None:
    assert not _decide("k", 3, waited_ms=1000, idle=False)
    assert _decide("k", 4, waited_ms=0, idle=False)
    # Three live guests, all waiting on their results: nothing more can arrive.
    assert _decide("k", 3, waited_ms=0, idle=True)


def test_t_waits_for_the_oldest_command_and_says_how_long() -> None:
    b = Batcher(RuntimeConfig(batch_policy="t", batch_t_ms=10.0))
    d = b.decide(False, _queues(8, 100.0), 100.004, guests_idle=True)
    assert not d.fire and d.wait_s is not None and abs(d.wait_s - 0.006) < 1e-9
    assert _decide("t", 1, waited_ms=10, idle=False)


def test_k_or_t_fires_on_whichever_comes_first() -> None:
    assert _decide("k_or_t", 4, waited_ms=0, idle=False)
    assert _decide("k_or_t", 1, waited_ms=11, idle=False)
    assert not _decide("k_or_t", 3, waited_ms=2, idle=True)


def test_higher_priority_queues_come_first_then_by_age() -> None:
    b = Batcher(RuntimeConfig())
    qs = _queues(4, submitted_at=1.0)
    qs[0].priority, qs[1].priority, qs[2].priority, qs[3].priority = 1, 0, 2, 1
    for q in qs:
        b.add_queue(q)
    assert [q.owner for q in b.ready_heads()] == [2, 0, 3, 1]
