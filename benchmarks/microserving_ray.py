"""``microserving.py --ray``: the same workloads on two engines started here and on two
engines placed as Ray actors (a Ray cluster started on this machine, the engines pinned
to one core each as the local ones are), paired run by run.

Both pairs are up for the whole run and take turns (the order alternating by seed), so a
slow minute of the machine hits both; an idle pair costs nothing. Reported: each cell's
mean JCT on Ray over the same cell's on local engines, and the median of those ratios
(the target: within 10 %, the cost of placement being small).

    python benchmarks/microserving.py --ray [--model small] [--requests 40] [--seeds 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from microserving import Runner, capacity, local_pair, log

STRATEGIES = ["dp", "pd"]


@contextlib.asynccontextmanager
async def ray_pair(model: str, extra: list[str], vocab: int, lengths: dict[str, tuple[int, int]]
                   ) -> AsyncIterator[tuple[Runner, list[dict[str, Any]]]]:  # fmt: skip
    # A cluster of this machine alone, on loopback (Ray would pick the routable address).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from loom.router.ray_placement import RayPlacement
    from loom.router.strategies import StrategyRouter

    placement = RayPlacement("local", model, extra, engine_cpus=1.0)
    try:
        urls = placement.start(2)
        router = StrategyRouter(urls)
        yield Runner(router, vocab, lengths), [placement.describe(u) for u in urls]
        await router.close()
    finally:
        placement.close()


async def compare(args: argparse.Namespace, model: str, extra: list[str], vocab: int,
                  lengths: dict[str, tuple[int, int]]) -> dict[str, Any]:  # fmt: skip
    out: dict[str, Any] = {"model": args.model, "dtype": args.dtype, "lengths": lengths,
                           "requests": args.requests, "seeds": args.seeds, "capacity": {},
                           "runs": []}  # fmt: skip
    async with local_pair(model, extra, vocab, lengths) as (local, _), \
            ray_pair(model, extra, vocab, lengths) as (ray, where):  # fmt: skip
        out["ray_engines"] = where
        pairs = {"local": local, "ray": ray}
        for kind in args.workloads.split(","):
            cap = out["capacity"][kind] = await capacity(local.router, kind, vocab, lengths)
            await capacity(ray.router, kind, vocab, lengths)  # warms the Ray pair up alike
            for load in [float(x) for x in args.loads.split(",")]:
                for seed in range(args.seeds):
                    for name in STRATEGIES:
                        order = ["local", "ray"] if seed % 2 == 0 else ["ray", "local"]
                        for placed in order:
                            s = await pairs[placed].run(kind, name, args.requests, load * cap,
                                                        seed)  # fmt: skip
                            out["runs"].append({"workload": kind, "strategy": name,
                                                "load": load, "seed": seed,
                                                "placement": placed, **s})  # fmt: skip
                            log(kind, f"{name}@{placed}", load, load * cap, seed, s)
    return out


def report(data: dict[str, Any], out_json: Path) -> dict[str, Any]:
    """Per cell (workload, strategy, load, seed) the Ray/local ratio of mean JCT, the
    table of cells averaged over seeds, and the summary; written to ``out_json``."""
    runs = {(r["workload"], r["strategy"], r["load"], r["seed"], r["placement"]): r
            for r in data["runs"]}  # fmt: skip
    ratios: dict[tuple[str, str, float], list[float]] = {}
    for (kind, name, load, seed, placed), r in runs.items():
        if placed == "ray":
            local = runs[(kind, name, load, seed, "local")]
            ratios.setdefault((kind, name, load), []).append(r["jct_mean"] / local["jct_mean"])
    print(f"\n{'workload':<8} {'strategy':<8} {'load':>5} {'JCT local':>10} {'JCT Ray':>10} "
          f"{'Ray/local':>10}")  # fmt: skip
    table = []
    for (kind, name, load), rs in sorted(ratios.items()):
        cells = [r for k, r in runs.items() if k[:3] == (kind, name, load)]
        jl = statistics.mean(r["jct_mean"] for r in cells if r["placement"] == "local")
        jr = statistics.mean(r["jct_mean"] for r in cells if r["placement"] == "ray")
        ratio = statistics.median(rs)
        table.append({"workload": kind, "strategy": name, "load": load, "jct_local": jl,
                      "jct_ray": jr, "jct_ratio_ray_over_local": ratio})  # fmt: skip
        print(f"{kind:<8} {name:<8} {load:5.2f} {jl:9.2f}s {jr:9.2f}s {ratio:9.3f}x")
    all_ratios = [x for rs in ratios.values() for x in rs]
    summary = {"jct_ratio_ray_over_local_median": statistics.median(all_ratios),
               "jct_ratio_ray_over_local_max_cell": max(t["jct_ratio_ray_over_local"]
                                                        for t in table),
               "within_10_percent": abs(statistics.median(all_ratios) - 1.0) <= 0.10}  # fmt: skip
    print(f"\nmedian Ray/local JCT over {len(all_ratios)} paired runs: "
          f"{summary['jct_ratio_ray_over_local_median']:.3f}x (target within 10 %)")  # fmt: skip
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps({**data, "table": table, "summary": summary}, indent=1))
    print(f"wrote {out_json}", file=sys.stderr)
    return summary
