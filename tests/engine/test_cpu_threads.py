"""The engine gives up a torch thread while another process keeps one of its cores busy,
and takes it back when that process is gone (a real busy process, real /proc/stat)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from loom.engine.cpu_threads import ThreadGovernor

pytestmark = pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2
    or not os.path.exists("/proc/stat"),
    reason="needs two cores and /proc/stat",
)  # fmt: skip


def _poll_until(gov: ThreadGovernor, want: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if gov.poll() == want:
            return want
        time.sleep(0.05)
    return gov.threads


def test_a_busy_core_costs_one_thread_and_it_comes_back() -> None:
    before = torch.get_num_threads()
    core = min(os.sched_getaffinity(0))
    busy = subprocess.Popen(["taskset", "-c", str(core), sys.executable, "-c", "while True: pass"])
    try:
        gov = ThreadGovernor(max_threads=2, interval_s=0.2)
        assert _poll_until(gov, 1, timeout_s=5.0) == 1, f"others at {gov.others:.2f} cores"
        assert torch.get_num_threads() == 1
        assert gov.others > 0.5
    finally:
        busy.kill()
        busy.wait()
    try:
        assert _poll_until(gov, 2, timeout_s=5.0) == 2, f"others at {gov.others:.2f} cores"
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_an_idle_machine_keeps_every_thread() -> None:
    before = torch.get_num_threads()
    try:
        gov = ThreadGovernor(max_threads=2, interval_s=0.1)
        time.sleep(0.15)
        # This process itself being busy is not contention.
        t = time.monotonic()
        while time.monotonic() - t < 0.3:
            pass
        assert gov.poll() == 2
    finally:
        torch.set_num_threads(before)
