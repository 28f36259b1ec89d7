"""Launch cohorts (``Runtime.launch_batch``): members' work waits for the whole cohort to
start, then rides the same passes; a member that never waits does not hold the rest."""

from __future__ import annotations

import json
from typing import Any

import pytest

from loom.runtime.cohort import Cohort
from loom.runtime.commands import CommandQueue


def test_cohort_releases_when_every_member_ended_its_first_turn() -> None:
    cohort = Cohort({1, 2}, last_progress=0.0)
    q = CommandQueue(owner=1)
    cohort.hold(q)
    assert q.held
    assert not cohort.first_turn_over(1, 0.1)
    assert not cohort.first_turn_over(1, 0.1)  # counted once
    assert cohort.first_turn_over(2, 0.2)
    cohort.release()
    assert not q.held
    late = CommandQueue(owner=2)
    cohort.hold(late)  # a queue made after the release is not held
    assert not late.held


def test_cohort_stalls_after_the_hold_limit_without_progress() -> None:
    cohort = Cohort({1}, last_progress=10.0)
    assert not cohort.stalled(10.1, 0.2)
    assert cohort.stalled(10.3, 0.2)


def test_cohort_members_decode_as_launched_alone(rt: Any, testkit: str) -> None:
    args = ["decode", "5,6,7,8", "4"]
    alone = rt.launch(testkit, args)
    want = json.loads(alone.recv(timeout=60))
    assert alone.wait(60).ok
    handles = rt.launch_batch(testkit, [args] * 4)
    for h in handles:
        assert json.loads(h.recv(timeout=60)) == want
        assert h.wait(60).ok


def test_a_member_that_never_waits_does_not_hold_the_cohort(rt: Any, testkit: str) -> None:
    spinner, worker = rt.launch_batch(testkit, [["spin"], ["decode", "5,6,7,8", "3"]])
    assert len(json.loads(worker.recv(timeout=60))) == 3
    assert worker.wait(60).ok
    result = spinner.wait(60)  # ended by its CPU budget (1.5 s), after the worker's end
    assert not result.ok and "CPU budget" in (result.error or "")
    assert worker.finished_at is not None and spinner.finished_at is not None
    assert worker.finished_at < spinner.finished_at


def test_launch_batch_checks_the_program(rt: Any, testkit: str) -> None:
    with pytest.raises(KeyError):
        rt.launch_batch("no-such-program", [["hello"]])
    assert rt.launch_batch(testkit, []) == []
