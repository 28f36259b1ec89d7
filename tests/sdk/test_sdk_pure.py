"""The SDK's pure-Python parts, run natively: loop, samplers, stop conditions, KV math."""

from __future__ import annotations

import sys
from typing import Any, ClassVar

import pytest

from loom.sdk.build import SDK_DIR

sys.path.insert(0, str(SDK_DIR))

from inferlet import _kv, _loop
from inferlet.sampler import Greedy, MinP, Sampler, TopK, TopP
from inferlet.stop import IgnoreEos, MaxTokens, StopStrings, StopTokens, as_stop


class FakeFuture:
    """Stands in for a binding's future: the test decides when it is ready."""

    registry: ClassVar[dict[int, FakeFuture]] = {}

    def __init__(self, value: Any) -> None:
        self.id = len(FakeFuture.registry)
        FakeFuture.registry[self.id] = self
        self.value = value
        self.ready = False

    def pollable(self) -> int:
        return self.id

    def get(self) -> Any:
        return self.value if self.ready else None


class FakeHost:
    """``poll``: records what was submitted before each wait, then readies everything."""

    def __init__(self) -> None:
        self.submitted: list[str] = []
        self.polls: list[list[str]] = []

    def submit(self, name: str) -> FakeFuture:
        self.submitted.append(name)
        return FakeFuture(name.upper())

    def poll(self, ids: list[int]) -> list[int]:
        self.polls.append(list(self.submitted))
        self.submitted.clear()
        for i in ids:
            FakeFuture.registry[i].ready = True
        return list(range(len(ids)))


def test_gather_submits_every_branch_before_the_first_wait() -> None:
    host = FakeHost()

    async def step(name: str) -> str:
        first = await _loop.wait_for(host.submit(name))
        second = await _loop.wait_for(host.submit(name + "2"))
        return first + second

    async def main() -> list[str]:
        return await _loop.gather(*(step(n) for n in "abcd"))

    assert _loop.run(main(), host.poll) == ["AA2", "BB2", "CC2", "DD2"]
    # Two suspensions in all: each one carried the four branches' submissions.
    assert host.polls == [["a", "b", "c", "d"], ["a2", "b2", "c2", "d2"]]


def test_exceptions_reach_the_awaiting_task() -> None:
    host = FakeHost()

    async def bad() -> None:
        await _loop.wait_for(host.submit("x"))
        raise KeyError("lost")

    async def main() -> str:
        try:
            await _loop.gather(bad())
        except KeyError as e:
            return f"caught {e}"
        return "not raised"

    assert _loop.run(main(), host.poll) == "caught 'lost'"


def test_gather_raises_the_first_failure_while_a_sibling_still_waits() -> None:
    """A task waiting on a message its failed sibling would have sent must not hang
    ``gather``: the failure is raised at once (it was found only after the waiting
    task, first in order, ended: never)."""
    host = FakeHost()
    never = FakeFuture("never")  # never made ready: a message that will not come
    poll_ids: list[list[int]] = []

    def poll(ids: list[int]) -> list[int]:
        poll_ids.append(list(ids))
        if len(poll_ids) > 5:
            raise RuntimeError("gather hangs on the waiting task")
        ready = [i for i, pid in enumerate(ids) if pid != never.id]
        for i in ready:
            FakeFuture.registry[ids[i]].ready = True
        return ready

    async def waits() -> str:
        return await _loop.wait_for(never)  # type: ignore[no-any-return]

    async def fails() -> None:
        await _loop.wait_for(host.submit("x"))
        raise ValueError("the sender failed")

    async def ok() -> str:
        await _loop.yield_now()
        return "done"

    async def main() -> str:
        try:
            await _loop.gather(waits(), fails(), ok())
        except ValueError as e:
            return str(e)
        return "not raised"

    assert _loop.run(main(), poll) == "the sender failed"
    assert len(poll_ids) == 1  # raised right after the pass that failed the sender

    async def both() -> list[str]:  # results in order once all are done
        return await _loop.gather(ok(), ok())

    assert _loop.run(both(), host.poll) == ["done", "done"]


def test_spawned_tasks_and_deadlocks() -> None:
    host = FakeHost()

    async def child() -> int:
        await _loop.yield_now()
        return 7

    async def main() -> int:
        t = _loop.spawn(child())
        return await t + await t  # a finished task can be awaited again

    assert _loop.run(main(), host.poll) == 14

    async def stuck() -> None:
        async def never() -> None:
            await forever

        forever = _loop.spawn(never())
        await forever

    with pytest.raises(RuntimeError, match="deadlock"):
        _loop.run(stuck(), host.poll)


def test_a_stream_read_by_someone_else_is_waited_for_again() -> None:
    class Stream:
        def __init__(self) -> None:
            self.gets = 0

        def pollable(self) -> int:
            return 0

        def get(self) -> str | None:
            self.gets += 1
            return None if self.gets == 1 else "msg"

    stream = Stream()
    polls = []

    async def main() -> str:
        return await _loop.wait_for(stream)  # type: ignore[no-any-return]

    assert _loop.run(main(), lambda ids: polls.append(ids) or [0]) == "msg"
    assert len(polls) == 2


def test_samplers_validate_and_describe_themselves() -> None:
    assert Greedy().is_greedy and not TopP(0.9).is_greedy
    assert TopK(40, t=0.7) == Sampler(temperature=0.7, top_k=40)
    assert MinP(0.05).min_p == 0.05
    for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-2), dict(min_p=1.5)):
        with pytest.raises(ValueError):
            Sampler(**bad)  # type: ignore[arg-type]


def test_stop_conditions_combine_and_fire() -> None:
    stop = MaxTokens(10) | StopStrings("\n\n") | StopTokens(5) | MaxTokens(4)
    assert stop.max_tokens == 4 and stop.strings == ("\n\n",) and stop.token_ids == (5,)
    assert stop.hit([1, 2], "ab") is None
    assert stop.hit([1, 5], "ab") == "stop"
    assert stop.hit([1, 2], "a\n\nb") == "stop"
    assert stop.hit([1, 2, 3, 4], "abcd") == "length"
    assert stop.hit([9], "x", eos=(9,)) == "stop"
    assert (stop | IgnoreEos()).hit([9], "x", eos=(9,)) is None
    assert as_stop(["END", "STOP"], 8) == MaxTokens(8) | StopStrings("END", "STOP")
    with pytest.raises(ValueError):
        StopStrings("")


def test_page_math_and_shared_page_references() -> None:
    assert [_kv.pages_for(n, 16) for n in (0, 1, 16, 17)] == [0, 1, 1, 2]
    assert [_kv.last_page_len(n, 16) for n in (1, 16, 17, 32)] == [1, 16, 1, 16]
    refs = _kv.PageRefs()
    refs.hold([1, 2, 3])
    refs.hold([1, 2])  # a fork shares the first two pages
    assert refs.release([1, 2, 3]) == [3]  # the parent's release frees only its own page
    assert refs.release([1, 2]) == [1, 2]
    with pytest.raises(ValueError):
        refs.release([1])


def test_incremental_text_never_splits_a_character() -> None:
    pieces = {1: b"caf", 2: b"\xc3", 3: b"\xa9!"}

    def decode(ids: list[int]) -> str:
        return b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")

    text = _kv.IncrementalText(decode)
    assert [text.push(i) for i in (1, 2, 3)] == ["caf", "", "é!"]


def test_draft_trees_and_brle_rows() -> None:
    assert _kv.draft_tree([5, 6, 7]) == [(5, -1), (6, 0), (7, 1)]
    assert _kv.draft_tree([(5, -1), (6, -1), (7, 1)]) == [(5, -1), (6, -1), (7, 1)]
    with pytest.raises(ValueError):
        _kv.draft_tree([(5, 1)])
    assert _kv.encode_brle([False, False, True, True, False]) == [2, 2, 1]
    assert _kv.encode_brle([True]) == [0, 1]


def test_a_single_token_logit_mask_forbids_every_other_id() -> None:
    from loom.engine.masks import decode_brle

    for token in (0, 1, 17, 99):
        forbidden = decode_brle(_kv.only_token(token, 100)).tolist()
        assert len(forbidden) == 100
        assert [i for i, f in enumerate(forbidden) if not f] == [token]
    with pytest.raises(ValueError):
        _kv.only_token(100, 100)
