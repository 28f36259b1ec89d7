"""Two runtime settings side by side in one run: the shared part of the A/B benchmarks.

Both runtimes (process workers) live in this process at once. Rounds alternate between
them, in turns of order (the second of a pair tends to run faster on a noisy machine);
each round runs the Python test inferlet at every instance count, as
``runtime_overhead.py`` does (50 forward calls each). Rows are medians over the rounds;
the ratio is the second side's host time over the first's per round, then its median.
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


def add_arguments(ap: argparse.ArgumentParser, name: str) -> None:
    """The options every side-by-side benchmark takes; JSON to ``results/<name>.json``."""
    ap.add_argument("--instances", default="1,10,100", help="instance counts, comma-separated")
    ap.add_argument("--calls", type=int, default=50, help="forward calls per instance")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / f"{name}.json")


def instance_counts(args: argparse.Namespace) -> list[int]:
    return [int(x) for x in args.instances.split(",")]


def compare(
    sides: dict[str, dict[str, Any]],
    counts: list[int],
    calls: int,
    rounds: int,
    mode: str = "decode",
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run both ``sides`` (name -> ``start_runtime`` keyword arguments; the first is the
    baseline) alternately; return a row per instance count and the runtimes' placements.
    ``mode``: how the guests make their passes (``runtime_overhead.python_guest``)."""
    from loom.config import EngineConfig, RuntimeConfig
    from loom.models.tiny import ensure_tiny_model
    from loom.runtime.runtime import start_runtime
    from loom.sdk.build import build_inferlet
    from runtime_overhead import python_guest

    base, other = sides
    print("building the Python test inferlet (cached after the first time)...", file=sys.stderr)
    wasm = build_inferlet(ROOT / "tests" / "runtime" / "guests" / "testkit", sdk=False).read_bytes()
    pages = max(counts) * (-(-(3 + calls) // 16)) + 64
    runtimes: dict[str, tuple[Any, str]] = {}
    try:
        for side, kwargs in sides.items():
            rt = start_runtime(
                EngineConfig(model=str(ensure_tiny_model()), num_pages=pages),
                RuntimeConfig(page_wait_timeout_s=600),
                cache_dir=Path(tempfile.gettempdir()) / "loom-bench-programs",
                **kwargs,
            )
            runtimes[side] = (rt, rt.add_program(wasm))
            python_guest(rt, runtimes[side][1], 2, 3)  # warm-up
            print(f"{side}: {rt.placement.describe()}", file=sys.stderr)
        runs: dict[tuple[str, int], list[dict[str, float]]] = {
            (s, n): [] for s in sides for n in counts
        }
        for k in range(rounds):
            order = [base, other] if k % 2 == 0 else [other, base]
            for n in counts:
                for side in order:
                    rt, program = runtimes[side]
                    runs[side, n].append(python_guest(rt, program, n, calls, mode))
            print(f"  round {k + 1} of {rounds} done", file=sys.stderr)
        placements = {side: rt.placement.describe() for side, (rt, _) in runtimes.items()}
    finally:
        for rt, _ in runtimes.values():
            rt.close()

    rows = []
    for n in counts:
        row: dict[str, Any] = {"instances": n}
        for side in sides:
            for key in KEYS:
                row[f"{side}_{key}"] = statistics.median(r[key] for r in runs[side, n])
        ratios = [
            o["host_us_per_call"] / b["host_us_per_call"]
            for o, b in zip(runs[other, n], runs[base, n], strict=True)
        ]
        row["host_ratio"] = statistics.median(ratios)
        row[f"rounds_{other}_faster"] = sum(r < 1 for r in ratios)
        rows.append(row)
    return rows, placements


def report(
    rows: list[dict[str, Any]], sides: list[str], labels: tuple[str, str], rounds: int, out: Path,
    extra: dict[str, Any] | None = None,
) -> None:  # fmt: skip
    """Print the side-by-side table (``labels``: short column names of the two sides) and
    write the rows (and ``extra``) as JSON to ``out``."""
    base, other = sides
    ratio_head, faster_head = f"{labels[1]}/{labels[0]}", f"{labels[1]} faster"
    print()
    print(f"{'instances':>9} | {'host µs/call':>17} | {'in fns µs/call':>17} | "
          f"{'loop µs/batch':>17} | {'guest µs/fwd':>17} | {ratio_head:>15} | "
          f"{faster_head:>13}")  # fmt: skip
    pair = f"{labels[0]:>8} {labels[1]:>8}"
    print(f"{'':>9} | {pair} | {pair} | {pair} | {pair} | {'(host, median)':>15} | "
          f"{'(rounds)':>13}")  # fmt: skip
    print("-" * 120)
    for r in rows:
        cells = " | ".join(f"{r[base + '_' + key]:>8.1f} {r[other + '_' + key]:>8.1f}"
                           for key in KEYS[:4])  # fmt: skip
        print(f"{r['instances']:>9} | {cells} | {r['host_ratio']:>14.2f}x | "
              f"{r[f'rounds_{other}_faster']:>6} of {rounds:<3}")  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "rounds": rounds, **(extra or {})}, indent=2))
    print(f"wrote {out}")
