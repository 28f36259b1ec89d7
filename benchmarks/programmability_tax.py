"""What programmability costs: plain completion served four ways, side by side in one run.

(a) the built-in scheduler (``LLM.generate``), (b) a Python inferlet on the host fast
path (``ctx.generate``: one call per completion), (c) a Python inferlet looping
``ctx.decode_step()`` (one forward call per token, the loop in the guest), (d) a C
inferlet looping per token (``inferlets/c_completion``, the C ABI). Each at 1 and 32
concurrent requests on the ~40M "small" model; greedy, end-of-sequence ignored, every
system should produce the same tokens. The table shows the share of completions equal
to (a)'s: in bfloat16, greedy decoding of random weights meets near-ties, and a different
thread count or batch composition can flip one (the tests check equality in float32).

Time per output token = wall time of the run / tokens per request (what one request's
reader sees). Each of (b), (c), (d) runs right after a run of (a) of its own, and its
ratio is taken against that run: this machine's speed drifts by tens of percent within
seconds, and a ratio of neighbours cancels most of it. The table gives medians of
``--runs`` such ratios (and of the times: (a)'s over all its runs). Every request has
its own prompt (see ``prompts``). The engine gets the same torch threads in every system:
by default every core but one, the core the runtime thread (guests, host calls, batching)
runs on, as it would beside a GPU; ``--engine-threads`` all cores makes the runtime
compete with the engine for the CPU.

    python benchmarks/programmability_tax.py [--concurrency 1,32] [--tokens 32] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
PROMPT = (
    "The history of the city begins with a small settlement on the river, where traders "
    "met every spring to exchange grain, salt and cloth"
)


def prompts(n: int, run: int) -> list[str]:
    """One prompt per request, each with its own first words: identical prompts would let
    (a)'s prefix cache prefill once for all of them, which an inferlet (owning its context)
    does not do, and the table would show that instead of the cost of programmability. New
    prompts every run, for the same reason (finished sequences stay in (a)'s cache)."""
    return [f"Story {run}-{i}. {PROMPT}" for i in range(n)]


def run_builtin(llm: Any, n: int, tokens: int, run: int) -> tuple[float, list[str]]:
    from loom import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    ids = [llm.tokenizer.encode(p, add_special_tokens=False) for p in prompts(n, run)]
    t0 = time.perf_counter()
    outs = llm.generate(ids, params)
    return time.perf_counter() - t0, [o.text for o in outs]


def run_inferlet(
    rt: Any, program: str, n: int, tokens: int, mode: str, run: int
) -> tuple[float, list[str]]:
    t0 = time.perf_counter()
    handles = [rt.launch(program, [p, str(tokens), mode]) for p in prompts(n, run)]
    results = [h.wait(1800) for h in handles]
    wall = max(h.finished_at for h in handles) - t0
    bad = [r.error for r in results if not r.ok]
    if bad:
        raise RuntimeError(f"{len(bad)} inferlets failed: {bad[0]}")
    return wall, [h.recv(5) for h in handles]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--concurrency", default="1,32")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--model", default="small", help="small (~40M) or tiny")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "loom")
    ap.add_argument(
        "--engine-threads", type=int, default=None,
        help="torch threads of the engine, the same for (a) and the runtime's engine process "
        "(default: every core but one, which the runtime thread needs; the runtime's default)",
    )  # fmt: skip
    ap.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "programmability_tax.json"
    )
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]

    from engine_throughput import model_dir
    from loom import LLM
    from loom.config import EngineConfig
    from loom.runtime.runtime import start_runtime
    from loom.sdk.build import build_inferlet

    path = model_dir(args.model, args.cache)
    print("building the text-completion inferlet (cached after the first time)...", file=sys.stderr)
    wasm = build_inferlet(ROOT / "inferlets" / "text_completion").read_bytes()
    c_wasm = build_inferlet(ROOT / "inferlets" / "c_completion" / "app.c").read_bytes()
    kv_mb = 1024
    llm = LLM(str(path), dtype=args.dtype, kv_cache_memory_mb=kv_mb)
    import torch

    threads = args.engine_threads or max(1, (os.cpu_count() or 1) - 1)
    torch.set_num_threads(threads)
    rt = start_runtime(
        EngineConfig(model=str(path), dtype=args.dtype, kv_cache_memory_mb=kv_mb),
        cache_dir=Path(tempfile.gettempdir()) / "loom-bench-programs",
        engine_threads=threads,
    )
    rows: list[dict[str, Any]] = []
    try:
        program = rt.add_program(wasm)
        c_program = rt.add_program(c_wasm)
        run_builtin(llm, 2, 4, -1)  # warm-up of both systems
        run_inferlet(rt, program, 2, 4, "steps", -1)
        run_inferlet(rt, c_program, 2, 4, "", -1)
        systems = (("b", program, "fast"), ("c", program, "steps"), ("d", c_program, ""))
        for n in levels:
            times: dict[str, list[float]] = {"a": [], "b": [], "c": [], "d": []}
            ratios: dict[str, list[float]] = {"b": [], "c": [], "d": []}
            same = {"b": 0, "c": 0, "d": 0}
            for r in range(args.runs):
                for k, (key, prog, mode) in enumerate(systems):
                    seed = n * 1000 + r * 10 + k  # new prompts for each pair
                    wall_a, want = run_builtin(llm, n, args.tokens, seed)
                    wall, texts = run_inferlet(rt, prog, n, args.tokens, mode, seed)
                    same[key] += sum(t == w for t, w in zip(texts, want, strict=True))
                    times["a"].append(wall_a / args.tokens)
                    times[key].append(wall / args.tokens)
                    ratios[key].append(wall / wall_a)
            row = {"concurrency": n, **{k: statistics.median(v) * 1e3 for k, v in times.items()},
                   "ratio": {k: statistics.median(v) for k, v in ratios.items()},
                   "runs_ms": {k: [x * 1e3 for x in v] for k, v in times.items()},
                   "runs_ratio": ratios,
                   "same_text": {k: v / (n * args.runs) for k, v in same.items()}}  # fmt: skip
            rows.append(row)
            print(f"  concurrency {n} done", file=sys.stderr)
    finally:
        rt.close()

    print(f"\n{args.model} model ({args.dtype}), {args.tokens} new tokens, greedy; engine threads "
          f"{threads} for every system; ms per output token (median of {args.runs}); median "
          f"ratio to the run of (a) just before\n")  # fmt: skip
    print(f"{'concurrent':>10} | {'(a) builtin':>11} | {'(b) fast path':>18} | "
          f"{'(c) decode_step':>18} | {'(d) C loop':>18}")  # fmt: skip
    print("-" * 88)
    for r in rows:
        b, c, d = (r["ratio"][k] for k in "bcd")
        print(f"{r['concurrency']:>10} | {r['a']:>11.1f} | {r['b']:>9.1f} ({b:>5.2f}x) | "
              f"{r['c']:>9.1f} ({c:>5.2f}x) | {r['d']:>9.1f} ({d:>5.2f}x)")  # fmt: skip
    print("\nshare of completions equal to (a)'s: " + ", ".join(
        f"{r['concurrency']}: (b) {r['same_text']['b']:.0%} (c) {r['same_text']['c']:.0%} "
        f"(d) {r['same_text']['d']:.0%}"
        for r in rows))  # fmt: skip
    print("targets: (b) within 3% of (a); (c) within 15% of (a) at 32 concurrent")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                    "rows": rows}, indent=2))  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
