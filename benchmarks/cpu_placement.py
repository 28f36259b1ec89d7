"""Pinned vs unpinned cores: the runtime's host time per call, side by side in one run.

Two runtimes with process workers live in this process at once, one with ``pin_cpus``
(runtime thread and the worker's reader on the first core, the engine on the others) and
one without (every thread where the scheduler puts it); rounds alternate between them
(``side_by_side.py``). Rows are medians over the rounds; the ratio is pinned over
unpinned per round, then its median.

    python benchmarks/cpu_placement.py [--instances 1,10,100] [--rounds 12]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    from side_by_side import add_arguments, compare, instance_counts, report

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_arguments(ap, "cpu_placement")
    args = ap.parse_args()

    from loom.engine.worker.cpu_placement import allowed_cpus

    if len(allowed_cpus()) < 2:
        sys.exit("cpu_placement: needs two cores or more (pinning has nothing to split)")
    sides = {"unpinned": {"pin_cpus": False}, "pinned": {"pin_cpus": True}}
    rows, _ = compare(sides, instance_counts(args), args.calls, args.rounds)
    report(rows, list(sides), ("unpin", "pin"), args.rounds, args.out)


if __name__ == "__main__":
    main()
