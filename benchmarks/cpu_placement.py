"""Pinned vs unpinned cores: the runtime's host time per call, side by side in one run.

Two runtimes with process workers live in this process at once, one with ``pin_cpus``
(runtime thread and the worker's reader on the first core, the engine on the others) and
one without (every thread where the scheduler puts it). Rounds alternate between them,
in turns of order (the second of a pair tends to run faster on a noisy machine); each
round runs the Python test inferlet at every instance count, as ``runtime_overhead.py``
does (50 forward calls each). Rows are medians over the rounds; the ratio is pinned over
unpinned per round, then its median.

    python benchmarks/cpu_placement.py [--instances 1,10,100] [--rounds 12]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

KEYS = ("host_us_per_call", "in_fns_us_per_call", "loop_us_per_batch", "guest_us_per_forward",
        "wall_s")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--instances", default="1,10,100")
    ap.add_argument("--calls", type=int, default=50, help="forward calls per instance")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpu_placement.json"
    )
    args = ap.parse_args()
    counts = [int(x) for x in args.instances.split(",")]

    from loom.config import EngineConfig
    from loom.models.tiny import ensure_tiny_model
    from loom.runtime.cpu_placement import allowed_cpus
    from loom.runtime.limits import RuntimeConfig
    from loom.runtime.runtime import start_runtime
    from loom.sdk.build import build_inferlet
    from runtime_overhead import python_guest

    if len(allowed_cpus()) < 2:
        sys.exit("cpu_placement: needs two cores or more (pinning has nothing to split)")
    print("building the Python test inferlet (cached after the first time)...", file=sys.stderr)
    wasm = build_inferlet(ROOT / "tests" / "runtime" / "guests" / "testkit", sdk=False).read_bytes()
    pages = max(counts) * (-(-(3 + args.calls) // 16)) + 64
    sides: dict[str, tuple[Any, str]] = {}
    try:
        for side, pin in (("unpinned", False), ("pinned", True)):
            rt = start_runtime(
                EngineConfig(model=str(ensure_tiny_model()), num_pages=pages),
                RuntimeConfig(page_wait_timeout_s=600),
                cache_dir=Path(tempfile.gettempdir()) / "loom-bench-programs",
                pin_cpus=pin,
            )
            sides[side] = (rt, rt.add_program(wasm))
            python_guest(rt, sides[side][1], 2, 3)  # warm-up
        print(f"pinned: {sides['pinned'][0].placement.describe()}", file=sys.stderr)
        runs: dict[tuple[str, int], list[dict[str, float]]] = {
            (s, n): [] for s in sides for n in counts
        }
        for k in range(args.rounds):
            order = ["unpinned", "pinned"] if k % 2 == 0 else ["pinned", "unpinned"]
            for n in counts:
                for side in order:
                    rt, program = sides[side]
                    runs[side, n].append(python_guest(rt, program, n, args.calls))
            print(f"  round {k + 1} of {args.rounds} done", file=sys.stderr)
    finally:
        for rt, _ in sides.values():
            rt.close()

    rows = []
    for n in counts:
        row: dict[str, Any] = {"instances": n}
        for side in ("unpinned", "pinned"):
            for key in KEYS:
                row[f"{side}_{key}"] = statistics.median(r[key] for r in runs[side, n])
        ratios = [
            p["host_us_per_call"] / u["host_us_per_call"]
            for p, u in zip(runs["pinned", n], runs["unpinned", n], strict=True)
        ]
        row["host_ratio"] = statistics.median(ratios)
        row["rounds_pinned_faster"] = sum(r < 1 for r in ratios)
        rows.append(row)

    print()
    print(f"{'instances':>9} | {'host µs/call':>17} | {'in fns µs/call':>17} | "
          f"{'loop µs/batch':>17} | {'guest µs/fwd':>17} | {'pinned/unpinned':>15} | "
          f"{'pinned faster':>13}")  # fmt: skip
    pair = f"{'unpin':>8} {'pin':>8}"
    print(f"{'':>9} | {pair} | {pair} | {pair} | {pair} | {'(host, median)':>15} | "
          f"{'(rounds)':>13}")  # fmt: skip
    print("-" * 120)
    for r in rows:
        cells = " | ".join(
            f"{r['unpinned_' + key]:>8.1f} {r['pinned_' + key]:>8.1f}" for key in KEYS[:4]
        )
        print(f"{r['instances']:>9} | {cells} | {r['host_ratio']:>14.2f}x | "
              f"{r['rounds_pinned_faster']:>6} of {args.rounds:<3}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "rounds": args.rounds}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
