"""The technique inferlets next to their naive baselines, side by side in one run.

For every technique of ``inferlets/`` an *instance* is one run of the technique and a
*baseline instance* is the same work done the naive way: nothing shared (the tree, the
samples, the branches as separate prompts: the apps' ``separate``/``share: false``
switches), no speculation (greedy ``text_completion``), full attention instead of a
window, the prefix recomputed instead of imported, and so on (``CASES``). ``1`` and
``16`` instances run at once (``--concurrency``); the two systems alternate for
``--rounds`` rounds (paired: noise hits both alike) and the medians are reported.

Per point: instances per second (throughput), mean instance latency, engine passes and
tokens computed per instance (``/metrics``); per technique the speed-up over its baseline
(the median of the rounds' ratios). A real ``loom serve`` process on 127.0.0.1 per engine
mode: measured time (``--engine-step-ms 0``) and the constant-step-time mode
(``--engine-step-ms 10``: every pass costs the same whatever its size, as a decode pass
does on a GPU). The server's automatic prefix cache is off (``--prefix-cache`` turns it
on) so that the baselines share nothing the technique does not share explicitly.

    python benchmarks/techniques.py [--model tiny] [--concurrency 1,16] [--rounds 3] \\
        [--engine-step-ms 0,10] [--only tree_of_thought,...]

Writes ``benchmarks/results/techniques.json`` and ``techniques.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

# One launch: (the inferlet's folder under inferlets/, its arguments).
Launch = tuple[str, list[str]]
# Instance ``i`` of run ``r`` -> the launches that make it (run concurrently).
Plan = Callable[[int, int], list[Launch]]

DOC = (
    "The old mill stands where the river bends below the village. Its wheel turned for "
    "two hundred years, grinding the valley's wheat into flour that the traders carried "
    "over the pass to the market towns. The miller kept a ledger of every sack, every "
    "flood and every broken cog, and the ledger survives in the village hall. "
)  # ~70 tokens; repeated below for longer prefixes
QUOTING = (  # a document that quotes itself: what prompt lookup drafts from
    "def area(w, h):\n    return w * h\n\n"
    "def perimeter(w, h):\n    return 2 * (w + h)\n\n"
    "def area(w, h):\n    return w * h\n\n"
    "def perimeter(w, h):\n    return 2 * (w + h)\n\n"
    "def area("
)


def _tc(prompt: str, tokens: int, mode: str = "fast") -> Launch:
    return ("text_completion", [prompt, str(tokens), mode, "ignore"])


def _tag(r: int, i: int) -> str:
    return f"Case {r}.{i}. "  # instances differ: no run reuses another's tokens


def _thought(app: str, cfg: dict[str, Any]) -> tuple[Plan, Plan]:
    key = "question" if app == "skeleton_of_thought" else "problem"

    def plan(share: bool) -> Plan:
        return lambda r, i: [(app, [json.dumps({**cfg, key: _tag(r, i) + DOC, "share": share})])]

    return plan(True), plan(False)


def _section(text: str, children: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"text": text, "children": children or []}


def _sections(r: int, i: int) -> dict[str, Any]:
    """A nested document: a title, two chapters, two sections each (7 sections)."""
    return _section(_tag(r, i) + "Notes on the mill.", [
        _section(f" Chapter {c}: the {topic}.", [
            _section(f" Section {c}.{s}: " + DOC[s * 60 : s * 60 + 120]) for s in (1, 2)
        ]) for c, topic in ((1, "wheel"), (2, "ledger"))
    ])  # fmt: skip


def _paths(node: dict[str, Any], above: str = "") -> list[str]:
    """Each section under its ancestors: the separate prompts that read the sections apart."""
    text = above + node["text"]
    return [text] + [p for child in node["children"] for p in _paths(child, text)]


def _flat(node: dict[str, Any]) -> str:
    return str(node["text"]) + "".join(_flat(c) for c in node["children"])


QUESTION = "\nQuestion: what is this about?\nAnswer:"


@dataclass(frozen=True)
class Case:
    """A technique and its naive baseline; ``generated``: tokens generated per instance."""

    name: str
    technique: Plan
    baseline: Plan
    baseline_name: str
    generated: int


def cases() -> list[Case]:
    prefix = DOC * 6  # ~420 tokens: a system prompt or document shared by every instance
    best = "Write a short story about the old mill. " + DOC
    tot, tot_b = _thought("tree_of_thought", {"depth": 3, "breadth": 3, "keep": 2, "tokens": 16})
    got, got_b = _thought("graph_of_thought", {"thoughts": 4, "tokens": 16})
    rot, rot_b = _thought("recursion_of_thought", {"depth": 2, "fanout": 2, "tokens": 12})
    sot, sot_b = _thought("skeleton_of_thought", {"points": 4, "skeleton_tokens": 24,
                                                  "tokens": 24})  # fmt: skip
    mark = {"samples": 4, "batch": 4, "tokens": 32}
    candidates = [" the wheel", " the ledger", " the river", " the market"]
    return [
        Case("prefix_caching",
             lambda r, i: [("prefix_caching", [prefix, _tag(r, i) + "Summary:", "16"])],
             lambda r, i: [_tc(prefix + _tag(r, i) + "Summary:", 16)],
             "prefix recomputed", 16),
        Case("prefix_tree",
             lambda r, i: [("prefix_tree", [_tag(r, i) + DOC * 2, "16"])],
             lambda r, i: [("prefix_tree", [_tag(r, i) + DOC * 2, "16", "separate"])],
             "8 separate prompts", 8 * 16),
        Case("best_of_n",
             lambda r, i: [("best_of_n", [_tag(r, i) + best, "8", "16"])],
             lambda r, i: [("best_of_n", [_tag(r, i) + best, "8", "16", "0.8", "separate"])],
             "8 separate prompts", 8 * 16),
        Case("beam_search",
             lambda r, i: [("beam_search", [_tag(r, i) + DOC, "4", "16"])],
             lambda r, i: [_tc(_tag(r, i) + DOC, 16)],
             "greedy", 16),
        Case("speculative_decoding",
             lambda r, i: [("speculative_decoding", [_tag(r, i) + QUOTING, "64"])],
             lambda r, i: [_tc(_tag(r, i) + QUOTING, 64)],
             "greedy", 64),
        # The same request again (a template, a popular question): the suffix cache of
        # earlier outputs drafts it. (Random weights never copy their prompt, so prompt
        # lookup above drafts little; the warm-up run fills this cache.)
        Case("speculative_suffix",
             lambda r, i: [("speculative_decoding", [QUOTING, "64", "suffix"])],
             lambda r, i: [_tc(QUOTING, 64)],
             "greedy", 64),
        Case("jacobi_decoding",
             lambda r, i: [("jacobi_decoding", [_tag(r, i) + QUOTING, "32", "8"])],
             lambda r, i: [_tc(_tag(r, i) + QUOTING, 32)],
             "greedy", 32),
        Case("attention_sink",
             lambda r, i: [("attention_sink", [_tag(r, i) + DOC, "256", "4", "60"])],
             lambda r, i: [_tc(_tag(r, i) + DOC, 256, "steps")],
             "full attention", 256),
        Case("windowed_attention",
             lambda r, i: [("windowed_attention", [_tag(r, i) + DOC, "256", "64"])],
             lambda r, i: [_tc(_tag(r, i) + DOC, 256, "steps")],
             "full attention", 256),
        Case("hierarchical_attention",
             lambda r, i: [("hierarchical_attention",
                            [json.dumps({"doc": _sections(r, i), "max_tokens": 16})])],
             lambda r, i: [*(_tc(p, 1) for p in _paths(_sections(r, i))),
                           _tc(_flat(_sections(r, i)) + QUESTION, 16)],
             "a prompt per section", 16),
        Case("tree_of_thought", tot, tot_b, "separate prompts", 16 * (3 + 6 + 6)),
        Case("graph_of_thought", got, got_b, "separate prompts", 16 * 8),
        Case("recursion_of_thought", rot, rot_b, "separate prompts", 12 * 13),
        Case("skeleton_of_thought", sot, sot_b, "separate prompts", 24 * 5),
        Case("watermarking",
             lambda r, i: [("watermarking", [json.dumps({**mark, "key": r * 100 + i,
                                                          "only": "marked"})])],
             lambda r, i: [("watermarking", [json.dumps({**mark, "key": r * 100 + i,
                                                          "only": "unmarked"})])],
             "unmarked sampling", 4 * 32),
        Case("output_validation",
             lambda r, i: [("output_validation", [_tag(r, i) + DOC + "It ground", *candidates])],
             lambda r, i: [("output_validation",
                            ["--separate", _tag(r, i) + DOC + "It ground", *candidates])],
             "separate prompts", 0),
    ]  # fmt: skip


# ----- running -----


async def run_instances(
    url: str, programs: dict[str, str], plans: list[list[Launch]]
) -> list[float]:
    """Every instance's launches at once; returns each instance's latency (its last
    launch's end)."""
    from loom.client import Client

    async with await Client.connect(url) as client:

        async def launch(app: str, args: list[str]) -> None:
            inst = await client.launch(programs[app], args)
            status = await inst.wait()
            if not status.ok:
                raise RuntimeError(f"{app} failed: {status.error}")

        async def instance(launches: list[Launch]) -> float:
            t0 = time.perf_counter()
            await asyncio.gather(*(launch(app, args) for app, args in launches))
            return time.perf_counter() - t0

        return list(await asyncio.gather(*(instance(p) for p in plans)))


def measure(url: str, programs: dict[str, str], plans: list[list[Launch]]) -> dict[str, float]:
    from agents import scrape

    before = scrape(url)
    t0 = time.perf_counter()
    lat = asyncio.run(run_instances(url, programs, plans))
    wall = time.perf_counter() - t0
    after = scrape(url)
    n = len(plans)
    return {
        "per_s": n / wall,
        "wall_s": wall,
        "latency_mean_s": statistics.fmean(lat),
        "passes": after["loom_engine_passes"] - before["loom_engine_passes"],  # all of them
        "tokens_per_instance": (
            after["loom_engine_pass_tokens"] - before["loom_engine_pass_tokens"]
        ) / n,
    }  # fmt: skip


_RUNS = iter(range(1_000_000))


def compare(url: str, programs: dict[str, str], case: Case, n: int, rounds: int) -> dict[str, Any]:
    """``rounds`` paired rounds of ``n`` instances of the technique and of its baseline."""
    runs: dict[str, list[dict[str, float]]] = {"technique": [], "baseline": []}
    for r in range(rounds):
        order = ("technique", "baseline") if r % 2 == 0 else ("baseline", "technique")
        for system in order:
            plan = case.technique if system == "technique" else case.baseline
            run = next(_RUNS)
            runs[system].append(measure(url, programs, [plan(run, i) for i in range(n)]))
    pairs = zip(runs["technique"], runs["baseline"], strict=True)
    speedups = [b["wall_s"] / t["wall_s"] for t, b in pairs]
    out: dict[str, Any] = {"technique": case.name, "baseline": case.baseline_name,
                           "concurrency": n, "speedup": statistics.median(speedups)}  # fmt: skip
    for system, rows in runs.items():
        for key in rows[0]:
            out[f"{system}_{key}"] = statistics.median(row[key] for row in rows)
    gen = case.generated * n
    out["technique_tokens_per_s"] = gen / out["technique_wall_s"] if gen else 0.0
    out["baseline_tokens_per_s"] = gen / out["baseline_wall_s"] if gen else 0.0
    return out


def start(model: str, port: int, step_ms: float, prefix_cache: bool) -> Any:
    from serving import start_server

    extra = ["--num-pages", "4096", "--prefix-cache" if prefix_cache else "--no-prefix-cache"]
    if step_ms:
        extra += ["--engine-step-ms", f"{step_ms:g}"]
    return start_server(model, port, tuple(extra))


# ----- reporting -----


def print_table(rows: list[dict[str, Any]], step_ms: float) -> None:
    mode = f"constant step time, {step_ms:g} ms per pass" if step_ms else "measured time"
    print(f"\n{mode} (medians of paired rounds; speed-up = baseline time / technique time)\n")
    head = (f"{'technique':<23} {'baseline':<21} {'n':>3} | {'inst/s':>7} {'base/s':>7} | "
            f"{'lat s':>6} {'base':>6} | {'passes':>6} {'base':>6} | {'tokens':>6} "
            f"{'base':>6} | {'speed-up':>8}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['technique']:<23} {r['baseline']:<21} {r['concurrency']:>3} | "
              f"{r['technique_per_s']:>7.2f} {r['baseline_per_s']:>7.2f} | "
              f"{r['technique_latency_mean_s']:>6.2f} {r['baseline_latency_mean_s']:>6.2f} | "
              f"{r['technique_passes']:>6.0f} "
              f"{r['baseline_passes']:>6.0f} | "
              f"{r['technique_tokens_per_instance']:>6.0f} "
              f"{r['baseline_tokens_per_instance']:>6.0f} | {r['speedup']:>7.2f}x")  # fmt: skip


def plot(results: dict[str, list[dict[str, Any]]], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib missing: no PNG)", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, len(results), figsize=(7 * len(results), 6), squeeze=False)
    for ax, (mode, rows) in zip(axes[0], results.items(), strict=True):
        names = list(dict.fromkeys(r["technique"] for r in rows))
        levels = sorted({r["concurrency"] for r in rows})
        width = 0.8 / len(levels)
        for j, n in enumerate(levels):
            by = {r["technique"]: r["speedup"] for r in rows if r["concurrency"] == n}
            xs = [k + j * width for k in range(len(names))]
            ax.barh(xs, [by.get(name, 0.0) for name in names], height=width, label=f"{n} at once")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks([k + width * (len(levels) - 1) / 2 for k in range(len(names))], names)
        ax.invert_yaxis()
        ax.set_xlabel("speed-up over the naive baseline (time)")
        ax.set_title(mode)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny (the embedded default), small, micro")
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--engine-step-ms", default="0,10", help="0: measured; >0: ms per pass")
    ap.add_argument("--only", default="", help="comma-separated technique names")
    ap.add_argument("--prefix-cache", action="store_true", help="the server's automatic cache")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "techniques.json")
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    only = {x for x in args.only.split(",") if x}
    chosen = [c for c in cases() if not only or c.name in only]
    if only - {c.name for c in chosen}:
        ap.error(f"unknown techniques: {sorted(only - {c.name for c in chosen})}")

    from engine_throughput import model_dir
    from loom.client import Client
    from loom.sdk.build import build_inferlet
    from serving import free_port

    apps = sorted({app for c in chosen for p in (c.technique, c.baseline) for app, _ in p(0, 0)})
    wasm = {}
    for app in apps:
        print(f"building {app} ...", file=sys.stderr, flush=True)
        wasm[app] = build_inferlet(ROOT / "inferlets" / app).read_bytes()
    path = (
        args.model
        if args.model == "tiny"
        else str(model_dir(args.model, Path.home() / ".cache" / "loom"))
    )

    async def upload(url: str) -> dict[str, str]:
        async with await Client.connect(url) as client:
            return {app: await client.upload(w) for app, w in wasm.items()}

    results: dict[str, list[dict[str, Any]]] = {}
    failures: list[dict[str, str]] = []
    for step_ms in [float(x) for x in args.engine_step_ms.split(",")]:
        port = free_port()
        server = start(path, port, step_ms, args.prefix_cache)
        url = f"http://127.0.0.1:{port}"
        mode = f"step {step_ms:g} ms" if step_ms else "measured"
        try:
            programs = asyncio.run(upload(url))
            rows = []
            for case in chosen:
                try:
                    # Warm-up: compiles the programs, and builds prefix_caching's export.
                    measure(url, programs, [case.technique(-1, 0), case.baseline(-1, 0)])
                    for n in levels:
                        row = compare(url, programs, case, n, args.rounds)
                        rows.append(row)
                        print(f"[{mode}] {case.name} x{n}: {row['speedup']:.2f}x",
                              file=sys.stderr, flush=True)  # fmt: skip
                except Exception as exc:  # one failing technique does not end the run
                    print(f"[{mode}] {case.name} FAILED: {exc}", file=sys.stderr, flush=True)
                    failures.append({"mode": mode, "technique": case.name, "error": str(exc)})
            results[mode] = rows
            print_table(rows, step_ms)
        finally:
            server.terminate()
            server.wait(30)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "rounds": args.rounds,
                                    "prefix_cache": args.prefix_cache, "results": results,
                                    "failures": failures},
                                   indent=1))  # fmt: skip
    print(f"wrote {args.out}")
    plot(results, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
