"""Engine worker polling for its next op vs sleeping: the cost of sending it a batch.

Two parts, in one run:
1. The pipe write alone: this process writes a 120-byte message (the size of a one-token
   decode op) to a child on another core, which reads it with the worker's
   ``SpinningPipeReader``, spins 2 ms (the engine step), answers, and waits for the next
   one either sleeping (window 0) or polling (window 10 ms). This process waits 100 µs
   after each answer before writing again, as the runtime's turn does. Median µs per
   ``os.write``, alternating the two children for ``--pipe-rounds`` rounds.
2. The runtime: two process-worker runtimes, both pinned, one whose worker polls for
   ``IDLE_SPIN_S`` after each op (the default) and one whose worker sleeps at once;
   host time per call side by side (``side_by_side.py``).

    python benchmarks/engine_idle_spin.py [--instances 1,10,100] [--rounds 12]
        [--mode decode|wait-decode] [--pipe-rounds 6] [--pipe-writes 1000]
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import struct
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

MESSAGE = struct.pack("!i", 116) + b"x" * 116  # a frame as ``send_bytes`` writes it
STEP_S = 0.002  # the engine step the child stands in for
TURN_S = 0.0001  # the runtime's turn between a result and the next batch


def _reader_child(r: int, ack_w: int, spin_s: float, core: int) -> None:
    from loom.engine.worker.pipe_reader import SpinningPipeReader

    os.sched_setaffinity(0, {core})
    inbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
    reader = SpinningPipeReader(r, inbox.put, spin_s)
    threading.Thread(target=reader.run, daemon=True).start()
    while True:
        if inbox.empty():
            reader.idle()
        if inbox.get() is None:
            os._exit(0)
        t = time.perf_counter()
        while time.perf_counter() - t < STEP_S:
            pass
        os.write(ack_w, b"k")


def write_us(spin_s: float, writes: int, cores: list[int]) -> float:
    """Median µs per write to a child reading with a ``spin_s`` polling window."""
    r, w = os.pipe()
    ack_r, ack_w = os.pipe()
    pid = os.fork()  # (no threads in this process yet)
    if pid == 0:
        os.close(w)
        os.close(ack_r)
        try:
            _reader_child(r, ack_w, spin_s, cores[-1])
        finally:
            os._exit(1)
    os.close(r)
    os.close(ack_w)
    times = []
    try:
        for _ in range(writes):
            t = time.perf_counter()
            while time.perf_counter() - t < TURN_S:
                pass
            t0 = time.perf_counter_ns()
            os.write(w, MESSAGE)
            times.append(time.perf_counter_ns() - t0)
            os.read(ack_r, 1)
    finally:
        os.close(w)  # the child reads the end and exits
        os.waitpid(pid, 0)
        os.close(ack_r)
    return statistics.median(times[writes // 10 :]) / 1e3


def main() -> None:
    from side_by_side import add_arguments, compare, instance_counts, report

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_arguments(ap, "engine_idle_spin")
    ap.add_argument(
        "--mode", choices=("decode", "wait-decode"), default="decode",
        help="guests build each pass call by call, or make it with forward.step-wait",
    )  # fmt: skip
    ap.add_argument("--pipe-rounds", type=int, default=6)
    ap.add_argument("--pipe-writes", type=int, default=1000)
    args = ap.parse_args()

    from loom.engine.worker import IDLE_SPIN_S
    from loom.engine.worker.cpu_placement import allowed_cpus

    cores = sorted(allowed_cpus())
    if len(cores) < 2:
        sys.exit("engine_idle_spin: needs two cores or more (the worker polls only then)")

    os.sched_setaffinity(0, {cores[0]})
    windows = {"sleeping": 0.0, "polling": 0.01}
    pipe: dict[str, list[float]] = {side: [] for side in windows}
    for k in range(args.pipe_rounds):
        order = ["sleeping", "polling"] if k % 2 == 0 else ["polling", "sleeping"]
        for side in order:
            pipe[side].append(write_us(windows[side], args.pipe_writes, cores))
    os.sched_setaffinity(0, set(cores))
    pipe_us = {side: statistics.median(v) for side, v in pipe.items()}
    print(f"\npipe write, 120 bytes, reader on core {cores[-1]} (medians of {args.pipe_rounds} "
          f"rounds of {args.pipe_writes}): sleeping reader {pipe_us['sleeping']:.2f} µs, "
          f"polling reader {pipe_us['polling']:.2f} µs")  # fmt: skip

    sides = {
        "sleeping": {"engine_idle_spin_s": 0.0},
        "polling": {"engine_idle_spin_s": IDLE_SPIN_S},
    }
    rows, _ = compare(sides, instance_counts(args), args.calls, args.rounds, args.mode)
    extra = {
        "mode": args.mode,
        "pipe_write_us": pipe_us,
        "pipe_write_runs": pipe,
        "idle_spin_s": IDLE_SPIN_S,
    }
    report(rows, list(sides), ("sleep", "poll"), args.rounds, args.out, extra)


if __name__ == "__main__":
    main()
