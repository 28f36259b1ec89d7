"""A guest that spins is CPU-bound: its turns come after the others' and last one tick
(a tenth of ``--slice-ms``), so it delays another inferlet's next step by a tick, not by
a whole slice per step; beside other instances, spinners share ``--cpu-bound-share`` of
the runtime thread."""

from __future__ import annotations

import json
import time
from typing import Any

from tests.reliability.support import wait_for


def _decode_s(rrt: Any, testkit: str, steps: int) -> float:
    t0 = time.perf_counter()
    inst = rrt.launch(testkit, ["decode", "1,2,3,4", str(steps)])
    assert len(json.loads(inst.recv(60))) == steps
    assert inst.wait(30).ok
    return time.perf_counter() - t0


def test_a_spinning_guest_delays_others_by_a_tick_per_step(rrt: Any, testkit: str) -> None:
    wait_for(lambda: rrt.query(lambda: len(rrt.instances)) == 0)
    steps, slice_s = 40, 0.05
    saved = rrt.reconfigure(slice_ms=slice_s * 1000)
    spinners = []
    try:
        _decode_s(rrt, testkit, steps)  # (warm)
        alone = _decode_s(rrt, testkit, steps)
        spinners = [rrt.launch(testkit, ["spin"]) for _ in range(2)]
        wait_for(lambda: rrt.query(lambda: len(rrt.guests.cpu_share.bound)) == 2)
        beside = _decode_s(rrt, testkit, steps)
        # A whole slice of each spinner per step would add >= steps * slice_s / 2 (the
        # slice ends at the next tick: half a slice on average, each of two spinners).
        assert beside - alone < steps * slice_s / 4, (alone, beside)
        # Beside another live instance, spinners get --cpu-bound-share of the thread.
        waiter = rrt.launch(testkit, ["echo"])
        cpu_s = [rrt.query(lambda s=s: rrt.instances[s.id].cpu_s) for s in spinners]
        t0 = time.perf_counter()
        time.sleep(2.0)
        used = sum(rrt.query(lambda s=s: rrt.instances[s.id].cpu_s) for s in spinners)
        share = (used - sum(cpu_s)) / (time.perf_counter() - t0)
        assert 0.05 < share < 0.4, share  # (0.25 by default; ~1.0 unheld)
        waiter.send("bye")
        assert waiter.wait(30).ok
    finally:
        for s in spinners:
            s.kill()
        rrt.reconfigure(saved)
    assert all(not s.wait(30).ok for s in spinners)
    wait_for(lambda: rrt.query(lambda: not rrt.guests.cpu_share.bound))
