"""Microserving strategies under load: 2 real engine processes, one core each, a router in
this process, seeded Poisson arrivals.

Workloads: ``long`` (long prompt, short output; 512/16 by default), ``chat`` (64/64),
``shared`` (a few long documents shared by many short questions; 448 + 32 / 16).
Strategies: dp, pd, balanced pd (f = 0.1, 0.3; 0.5 on ``chat``); on ``shared`` dp, pd, prefix-aware
pd, and pd on a second pair of engines started without prefix caches (``pd-nocache``: the
P/D of a system without prefix caching, the baseline prefix-aware P/D is measured against).
Per request: TTFT (arrival -> first token at the router), TPOT ((last - first) / (n - 1)),
JCT (arrival -> last token); mean and p99, throughput, KV bytes transferred. Rates are
multiples of one engine's measured capacity for the workload (1 / the latency of one
request alone), so a run means the same on a slower or faster machine. Timings are the
model's real compute on CPU (no cost model). The router and load generator share the
cores with the engines (2 cores here).

On the long workload the report finds the highest load DP sustains: the highest load of
the sweep below the first at which DP's queue grows through a longer run of DP alone
(``--probe-requests``; the later half of the requests waits over twice as long for a
first token as the earlier half), and compares the P/D strategies with DP there (the
target: mean JCT at least 15 % lower). For ``shared`` it compares prefix-aware P/D's TTFT
with pd-nocache's (target: at least 2x lower) and, for the record, with plain pd on
caching engines.

    python benchmarks/microserving.py [--model small] [--requests 60] [--seeds 2]

With ``--ray`` it runs dp and pd on locally started engines and on Ray-placed engines,
paired, and reports the JCT ratio (``microserving_ray.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import statistics
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def make_requests(
    kind: str, n: int, rate: float, seed: int, vocab: int, lengths: dict[str, tuple[int, int]]
) -> list[tuple[float, list[int], int]]:
    """(arrival time, prompt tokens, output tokens) with Poisson arrivals at ``rate``/s."""
    rng = random.Random(seed)
    t, out = 0.0, []
    docs = [[rng.randrange(100, vocab) for _ in range(lengths["shared"][0])] for _ in range(4)]
    for i in range(n):
        t += rng.expovariate(rate)
        if kind == "shared":
            doc = docs[rng.randrange(len(docs))]
            question = [rng.randrange(100, vocab) for _ in range(32)]
            out.append((t, doc + question, lengths["shared"][1]))
        else:
            p, o = lengths[kind]
            out.append((t, [rng.randrange(100, vocab) for _ in range(p)], o))
        del i
    return out


async def drive(
    router: Any, requests: list[tuple[float, list[int], int]], tag: str
) -> list[dict[str, Any]]:
    from loom.router.router import RoutedRequest

    loop = asyncio.get_running_loop()
    t0 = loop.time()
    results: list[dict[str, Any]] = []

    async def one(k: int, at: float, prompt: list[int], n: int) -> None:
        await asyncio.sleep(max(0.0, t0 + at - loop.time()))
        start = loop.time()
        first = last = None
        req = RoutedRequest(
            prompt, f"{tag}-{k}", {"max_tokens": n, "temperature": 0, "ignore_eos": True}
        )
        async for chunk in router.handle(req):
            if any(c.get("finish_reason") is None for c in chunk.get("choices", [])):
                last = loop.time()
                first = first or last
        assert first is not None and last is not None
        results.append(
            {
                "k": k,
                "ttft": first - start,
                "tpot": (last - first) / max(1, n - 1),
                "jct": last - start,
                "bytes": req.transferred_bytes,
                "done": last - t0,
            }
        )

    await asyncio.gather(*(one(k, at, p, n) for k, (at, p, n) in enumerate(requests)))
    return sorted(results, key=lambda r: r["k"])  # arrival order


def summarize(rows: list[dict[str, Any]]) -> dict[str, float]:
    def p99(xs: list[float]) -> float:
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(0.99 * len(xs)))]

    out: dict[str, float] = {}
    for key in ("ttft", "tpot", "jct"):
        xs = [r[key] for r in rows]
        out[f"{key}_mean"] = statistics.mean(xs)
        out[f"{key}_p99"] = p99(xs)
    out["throughput"] = len(rows) / max(r["done"] for r in rows)
    # Whether the strategy keeps up with the arrivals: mean TTFT of the later half of the
    # requests (by arrival) over that of the earlier half. A stable queue keeps it near 1;
    # a queue that grows through the run (arrivals outpace service) makes it ~3, since
    # every request then waits for all the backlog before it.
    half = len(rows) // 2
    early = statistics.mean(r["ttft"] for r in rows[:half])
    late = statistics.mean(r["ttft"] for r in rows[half:])
    out["ttft_growth"] = late / max(early, 1e-3)
    out["bytes"] = sum(r["bytes"] for r in rows)
    return out


def strategy_for(name: str) -> Any:
    from loom.router.strategies import DataParallel, PrefillDecode, PrefixAwarePD

    return {
        "dp": DataParallel(),
        "pd": PrefillDecode(),
        "pd-nocache": PrefillDecode(),  # the same strategy, on engines without prefix caches
        "pd-f0.1": PrefillDecode(balance=0.1),
        "pd-f0.3": PrefillDecode(balance=0.3),
        "pd-f0.5": PrefillDecode(balance=0.5),
        "prefix-pd": PrefixAwarePD(bypass_below=64),
    }[name]


STRATEGIES = {
    "long": ["dp", "pd", "pd-f0.1", "pd-f0.3"],
    "chat": ["dp", "pd", "pd-f0.1", "pd-f0.3", "pd-f0.5"],
    "shared": ["dp", "pd", "prefix-pd"],
}


async def capacity(
    router: Any, kind: str, vocab: int, lengths: dict[str, tuple[int, int]]
) -> float:
    """Requests per second one engine sustains for ``kind``, run one at a time (a rough
    service rate: 1 / mean latency)."""
    from loom.router.strategies import DataParallel

    router.strategy = DataParallel()
    reqs = make_requests(kind, 8, 1000.0, 99, vocab, lengths)
    lat = []
    for k, (_, p, n) in enumerate(reqs):
        rows = await drive(router, [(0.0, p, n)], f"cap-{kind}-{k}")
        lat.append(rows[0]["jct"])
    return 1.0 / statistics.median(lat[1:])  # the first warms the engines up


class Runner:
    """Runs strategies on one pair of engines; every run gets a first token of its own,
    so no run finds another's prompts in an engine's prefix cache (within a run,
    ``shared`` requests still share their documents)."""

    def __init__(self, router: Any, vocab: int, lengths: dict[str, tuple[int, int]]) -> None:
        self.router, self.vocab, self.lengths = router, vocab, lengths
        self.run_id = 0

    async def run(self, kind: str, name: str, n: int, rate: float, seed: int) -> dict[str, float]:
        self.router.strategy = strategy_for(name)
        self.run_id += 1
        first = 100 + self.run_id % (self.vocab - 100)
        reqs = make_requests(kind, n, rate, seed, self.vocab, self.lengths)
        reqs = [(a, [first, *p[1:]], k) for a, p, k in reqs]
        rows = await drive(self.router, reqs, f"{kind}-{name}-{rate:.3f}-{seed}-{self.run_id}")
        return summarize(rows)


def log(kind: str, name: str, load: float, rate: float, seed: int, s: dict[str, float]) -> None:
    print(
        f"{kind:<6} {name:<10} load {load:4.2f} ({rate:5.2f}/s) seed {seed}: "
        f"JCT {s['jct_mean']:6.2f}s p99 {s['jct_p99']:6.2f}s "
        f"TTFT {s['ttft_mean']:6.2f}s TPOT {1000 * s['tpot_mean']:6.1f}ms "
        f"{s['throughput']:5.2f} req/s  {s['bytes'] / 1e6:7.1f} MB",
        file=sys.stderr,
        flush=True,
    )


async def sweep(
    runner: Runner,
    kind: str,
    strategies: list[str],
    cap: float,
    args: argparse.Namespace,
    out: dict[str, Any],
) -> None:
    for load in [float(x) for x in args.loads.split(",")]:
        rate = load * cap
        for seed in range(args.seeds):
            # Strategies interleaved within a seed: a slow minute of the machine hits
            # them all rather than one.
            for name in strategies:
                s = await runner.run(kind, name, args.requests, rate, seed)
                run = {"workload": kind, "strategy": name, "load": load, "rate": rate}
                out["runs"].append({**run, "seed": seed, **s})
                log(kind, name, load, rate, seed, s)


async def sustained_loads(
    runner: Runner, kind: str, cap: float, args: argparse.Namespace
) -> dict[str, float]:
    """DP alone at each load, ascending, with ``--probe-requests`` requests (a longer run
    than the sweep's, so a queue that grows shows apart from the start-up transient): the
    TTFT growth of each (later half / earlier half). Stops after the first load DP does
    not keep up with."""
    growth: dict[str, float] = {}
    for load in sorted(float(x) for x in args.loads.split(",")):
        s = await runner.run(kind, "dp", args.probe_requests, load * cap, 1000)
        growth[str(load)] = s["ttft_growth"]
        log(kind, "dp-probe", load, load * cap, 1000, s)
        print(f"  TTFT growth {s['ttft_growth']:.2f}", file=sys.stderr, flush=True)
        if s["ttft_growth"] > SUSTAINED_GROWTH:
            break
    return growth


@contextlib.asynccontextmanager
async def local_pair(
    model: str, engine_args: list[str], vocab: int, lengths: dict[str, tuple[int, int]]
) -> AsyncIterator[tuple[Runner, list[dict[str, Any]]]]:
    """Two engines started here and a router over them, stopped on the way out; with
    where each runs."""
    from loom.router.engines import start_engines
    from loom.router.strategies import StrategyRouter

    engines = start_engines(2, model, extra_args=engine_args, quiet=True)
    try:
        router = StrategyRouter([e.url for e in engines])
        yield Runner(router, vocab, lengths), [{"url": e.url, "cpus": e.cpus} for e in engines]
        await router.close()
    finally:
        for e in engines:
            e.stop()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    if args.model == "tiny":
        model = "tiny"
    else:
        from engine_throughput import model_dir

        model = str(model_dir(args.model, Path.home() / ".cache" / "loom"))
    lengths = {
        "long": (args.long_prompt, args.long_output),
        "chat": (64, 64),
        "shared": (args.long_prompt - 64, 16),
    }
    from loom.models import resolve_model_dir
    from loom.models.config import ModelConfig

    vocab = min(2000, ModelConfig.from_dir(resolve_model_dir(model)).vocab_size)
    extra = ["--dtype", args.dtype, "--num-pages", str(args.num_pages)]
    if args.ray:
        from microserving_ray import compare

        return await compare(args, model, extra, vocab, lengths)
    kinds = args.workloads.split(",")
    out: dict[str, Any] = {
        "model": args.model,
        "dtype": args.dtype,
        "lengths": lengths,
        "requests": args.requests,
        "seeds": args.seeds,
        "capacity": {},
        "runs": [],
    }

    @contextlib.asynccontextmanager
    async def engine_pair(engine_args: list[str]) -> AsyncIterator[Runner]:
        async with local_pair(model, engine_args, vocab, lengths) as (runner, engines):
            out.setdefault("engines", engines)
            yield runner

    async with engine_pair(extra) as runner:
        for kind in kinds:
            cap = out["capacity"][kind] = await capacity(runner.router, kind, vocab, lengths)
            if kind == "long" and args.probe_requests > 0:
                out["dp_probe"] = await sustained_loads(runner, kind, cap, args)
            await sweep(runner, kind, STRATEGIES[kind], cap, args, out)
    if "shared" in kinds:
        # The baseline of prefix-aware P/D: the same P/D on engines that keep no prefix
        # cache, at the same arrival rates.
        async with engine_pair([*extra, "--no-prefix-cache"]) as runner:
            await sweep(runner, "shared", ["pd-nocache"], out["capacity"]["shared"], args, out)
    return out


# A run keeps up with its arrivals while the later half of its requests waits at most this
# many times as long for a first token as the earlier half (see ``summarize``).
SUSTAINED_GROWTH = 2.0


def targets(data: dict[str, Any], table: list[dict[str, Any]]) -> dict[str, Any]:
    """The two targets, printed and returned: P/D's mean JCT against DP's at the
    highest load DP sustains (long workload), prefix-aware P/D's TTFT against P/D without
    prefix caches (shared workload)."""
    cell = {(r["workload"], r["load"], r["strategy"]): r for r in table}
    out: dict[str, Any] = {}
    dp_rows = sorted(
        (r for r in table if r["workload"] == "long" and r["strategy"] == "dp"),
        key=lambda r: r["load"],
    )
    # DP's TTFT growth by load: from the long probe runs when there are, else the sweep's.
    probe = data.get("dp_probe") or {str(r["load"]): r["ttft_growth"] for r in dp_rows}
    if dp_rows:
        print(
            "\nDP's TTFT growth on the long workload (later half / earlier half; a growing "
            f"queue > {SUSTAINED_GROWTH:g}): "
            + ", ".join(f"load {float(k):g} {v:.2f}" for k, v in probe.items())
        )
        top = None
        for r in dp_rows:  # the highest load below the first one DP does not keep up with
            if probe.get(str(r["load"]), math.inf) > SUSTAINED_GROWTH:
                break
            top = r["load"]
        if top is None:
            print("DP keeps up with none of the loads tested: no comparison")
        else:
            dp = cell[("long", top, "dp")]["jct_mean"]
            ratios = {
                name: cell[("long", top, name)]["jct_mean"] / dp
                for (wl, load, name) in cell
                if wl == "long" and load == top and name != "dp"
            }
            highest = top == dp_rows[-1]["load"]
            out["long"] = {"load": top, "highest_tested": highest, "jct_vs_dp": ratios}
            print(
                f"highest load DP sustains: {top:g}"
                + (" (the highest tested)" if highest else "")
                + "; mean JCT vs DP there (target <= 0.85x): "
                + ", ".join(
                    f"{k} {v:.2f}x{' (met)' if v <= 0.85 else ''}" for k, v in ratios.items()
                )
            )
    shared = sorted({r["load"] for r in table if r["workload"] == "shared"})
    for load in shared:
        pa = cell.get(("shared", load, "prefix-pd"))
        if pa is None:
            continue
        row = {
            base: cell[("shared", load, base)]["ttft_mean"] / pa["ttft_mean"]
            for base in ("pd-nocache", "pd", "dp")
            if ("shared", load, base) in cell
        }
        out.setdefault("shared", {})[str(load)] = row
        print(
            f"shared load {load:g}: prefix-aware P/D lowers mean TTFT by "
            + ", ".join(f"{v:.2f}x vs {k}" for k, v in row.items())
            + " (target >= 2x vs pd-nocache)"
        )
    return out


def report(data: dict[str, Any], out_json: Path, out_png: Path) -> None:
    runs = data["runs"]
    keys = sorted({(r["workload"], r["load"], r["strategy"]) for r in runs})
    print(f"\nmodel {data['model']} ({data['dtype']}), 2 engines x 1 core; medians over seeds")
    print(
        f"{'workload':<8} {'load':>5} {'strategy':<10} {'JCT mean':>9} {'JCT p99':>9} "
        f"{'TTFT mean':>10} {'TTFT p99':>9} {'TPOT ms':>8} {'req/s':>6} {'MB sent':>8} "
        f"{'JCT vs dp':>9}"
    )
    table = []
    for wl, load, name in keys:
        rs = [r for r in runs if (r["workload"], r["load"], r["strategy"]) == (wl, load, name)]
        med = {
            k: statistics.median(r[k] for r in rs)
            for k in rs[0]
            if isinstance(rs[0][k], (int, float)) and k not in ("seed", "load")
        }
        dp = [r for r in runs if (r["workload"], r["load"], r["strategy"]) == (wl, load, "dp")]
        ratio = med["jct_mean"] / statistics.median(r["jct_mean"] for r in dp) if dp else 1.0
        table.append({"workload": wl, "load": load, "strategy": name, **med, "jct_vs_dp": ratio})
        print(
            f"{wl:<8} {load:5.2f} {name:<10} {med['jct_mean']:9.2f} {med['jct_p99']:9.2f} "
            f"{med['ttft_mean']:10.2f} {med['ttft_p99']:9.2f} {1000 * med['tpot_mean']:8.1f} "
            f"{med['throughput']:6.2f} {med['bytes'] / 1e6:8.1f} {ratio:8.2f}x"
        )
    data["table"] = table
    data["targets"] = targets(data, table)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(data, indent=2))
    print(f"wrote {out_json}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    workloads = sorted({r["workload"] for r in table})
    fig, axes = plt.subplots(2, len(workloads), figsize=(5 * len(workloads), 7), squeeze=False)
    for col, wl in enumerate(workloads):
        for row, metric in enumerate(("jct_mean", "ttft_mean")):
            ax = axes[row][col]
            for name in sorted({r["strategy"] for r in table if r["workload"] == wl}):
                pts = sorted(
                    (r["load"], r[metric])
                    for r in table
                    if r["workload"] == wl and r["strategy"] == name
                )
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
            ax.set_title(f"{wl}: {metric.replace('_', ' ')}")
            ax.set_xlabel("load (x one engine's capacity)")
            ax.set_ylabel("seconds")
            ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    print(f"wrote {out_png}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="small", help="small (~40M) or tiny")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--workloads", default="long,chat,shared")
    ap.add_argument(
        "--loads",
        default="1.0,1.5,2.0,2.5,3.0",
        help="multiples of one engine's capacity (batching lets 2 engines serve more than 2)",
    )
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument(
        "--probe-requests",
        type=int,
        default=150,
        help="requests of the DP runs that find the highest load DP sustains (0: the sweep's)",
    )
    ap.add_argument("--long-prompt", type=int, default=512)
    ap.add_argument("--long-output", type=int, default=16)
    ap.add_argument("--num-pages", type=int, default=2048)
    ap.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "microserving.json"
    )
    ap.add_argument("--ray", action="store_true", help="local engines against Ray-placed ones")
    args = ap.parse_args()
    if args.ray and args.out == ap.get_default("out"):
        args.out = args.out.with_name("microserving_ray.json")
    data = asyncio.run(main_async(args))
    if args.ray:
        from microserving_ray import report as report_ray

        report_ray(data, args.out)
        return
    report(data, args.out, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
