"""What programmability costs: plain completion served four ways, side by side in one run.

(a) the built-in scheduler (``LLM.generate``), (b) a Python inferlet on the host fast
path (``ctx.generate``: one call per completion), (c) a Python inferlet looping
``ctx.decode_step()`` (one forward call per token, the loop in the guest), (d) a C
inferlet looping per token (``inferlets/c_completion``, the C ABI). Greedy, end of
sequence ignored, every request with a prompt of its own. ``--mixed`` adds a run of N
inferlets (fast path) plus N host completions (what the OpenAI API submits) together,
against (a) with 2N requests.

Per system and concurrency level:
- ms/token: the run's wall time / tokens per request (what the slowest reader waits per
  token, start-up included);
- TPOT: time per output token after the first, per request ((last token - first token) /
  (tokens - 1)), averaged over requests: the decode cadence a streaming reader sees;
- passes per generated token (the engine's own count) as a ratio to (a)'s, sequences per
  pass, and the engine's idle time between passes while work was ready (the runtime's).

``--engine-timing gpu-like`` pads every engine pass to ``--step-ms`` (10) of wall time
whatever its size, as a launch-bound GPU decode step behaves: an extra pass or an idle
gap then costs what it would cost on a GPU, where on a CPU a pass costs in proportion to
its size. It uses the ``micro`` model by default, whose real passes stay inside the step.

Each of (b), (c), (d) runs right after a run of (a) of its own and its ratios are taken
against that run (this machine's speed drifts within seconds); the table gives medians.
Each run of (a) starts once the runtime has freed the stores of the instances that ended
before it (``settle``), so it is not charged for their freeing.

Inferlets are launched as one cohort (``Runtime.launch_batch``: every member's first pass
waits until all have started, as ``LLM.generate`` takes its prompts as one list), or with
``--launch each`` one ``launch`` at a time: then the members' starts, serial on the
runtime thread (~5-10 ms each for a Python inferlet), spread them over many passes.

    python benchmarks/programmability_tax.py [--concurrency 8,32,128] [--tokens 64] \\
        [--runs 3] [--engine-timing real|gpu-like] [--step-ms 10] [--mixed] \\
        [--launch batch|each]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
PROMPT = (
    "The history of the city begins with a small settlement on the river, where traders "
    "met every spring to exchange grain, salt and cloth"
)
SYSTEMS = {"b": "fast path", "c": "decode_step", "d": "C loop", "m": "mixed"}


def prompts(n: int, run: int) -> list[str]:
    """One prompt per request, each with its own first words: identical prompts would let
    (a)'s prefix cache prefill once for all of them, which an inferlet (owning its context)
    does not do. New prompts every run, for the same reason."""
    return [f"Story {run}-{i}. {PROMPT}" for i in range(n)]


def tpot(spans: list[tuple[float | None, float | None, int]]) -> float:
    """Mean over requests of (last - first) / (tokens - 1), from (first, last, tokens)."""
    per = [(b - a) / (n - 1) for a, b, n in spans if a is not None and b is not None and n > 1]
    return statistics.fmean(per) if per else float("nan")


def run_builtin(llm: Any, n: int, tokens: int, run: int) -> dict[str, Any]:
    from loom import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    ids = [llm.tokenizer.encode(p, add_special_tokens=False) for p in prompts(n, run)]
    stats = llm.engine.stats
    steps0, t0 = stats.num_steps, time.perf_counter()
    outs = llm.generate(ids, params)
    wall = time.perf_counter() - t0
    spans = [(o.first_token_at, o.last_token_at, len(o.token_ids)) for o in outs]
    return {
        "wall": wall,
        "tpot": tpot(spans),
        "passes": stats.num_steps - steps0,
        "idle": 0.0,
        "texts": [o.text for o in outs],
        "generated": n * tokens,
    }


def settle(rt: Any, timeout_s: float = 30.0) -> None:
    """Wait until the runtime has freed the stores of the instances that ended. It frees
    them while idle, after their ends are reported: left running into the next run of (a),
    that work (a pooled slot's first reset faults its resident part in: ~12 ms) would be
    charged to (a) on a small machine."""
    deadline = time.monotonic() + timeout_s
    while len(rt.guests.to_close) and time.monotonic() < deadline:
        time.sleep(0.005)


def run_system(
    rt: Any,
    program: str,
    n: int,
    tokens: int,
    mode: str,
    run: int,
    completions: int = 0,
    cohort: bool = True,
) -> dict[str, Any]:
    """``n`` instances of ``program`` (plus ``completions`` host completions) at once;
    ``cohort``: launched with ``launch_batch``, else one ``launch`` each."""
    from loom.engine.batch import SamplerSpec
    from loom.runtime.completions import CompletionRequest

    passes0, idle0 = rt.worker.stats().num_steps, rt.stats.engine_idle_s
    done = threading.Semaphore(0)
    spans: list[tuple[float | None, float | None, int]] = []
    t0 = time.perf_counter()
    args = [[p, str(tokens), mode, "ignore"] for p in prompts(n, run)]
    handles = rt.launch_batch(program, args) if cohort else [rt.launch(program, a) for a in args]
    for p in prompts(completions, run + 10_000):
        span: list[Any] = [None, None, 0]

        def delta(_: str, __: int, ___: Any, span: list[Any] = span) -> None:
            now = time.perf_counter()
            span[0] = span[0] or now
            span[1], span[2] = now, span[2] + 1

        def finish(_: Any, span: list[Any] = span) -> None:
            spans.append((span[0], span[1], span[2]))
            done.release()

        ids = rt.tokenizer.encode(p, add_special_tokens=False)
        rt.submit_completion(
            CompletionRequest(
                ids, SamplerSpec(temperature=0.0), tokens, finish, stop_at_eos=False, on_delta=delta
            )
        )
    results = [h.wait(1800) for h in handles]
    for _ in range(completions):
        done.acquire(timeout=1800)
    wall = time.perf_counter() - t0
    bad = [r.error for r in results if not r.ok]
    if bad:
        raise RuntimeError(f"{len(bad)} inferlets failed: {bad[0]}")
    spans += [(h.first_token_at, h.last_token_at, h.sampled) for h in handles]
    return {
        "wall": wall,
        "tpot": tpot(spans),
        "passes": rt.worker.stats().num_steps - passes0,
        "idle": rt.stats.engine_idle_s - idle0,
        "texts": [h.recv(5) for h in handles],
        "generated": (n + completions) * tokens,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--concurrency", default="8,32,128")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--systems", default="bcd", help="any of b, c, d")
    ap.add_argument("--mixed", action="store_true", help="also N inferlets + N completions")
    ap.add_argument("--engine-timing", choices=["real", "gpu-like"], default="real")
    ap.add_argument("--step-ms", type=float, default=10.0, help="gpu-like: wall time per pass")
    ap.add_argument(
        "--model",
        default=None,
        help="micro, tiny or small (default: small; micro with --engine-timing gpu-like)",
    )
    ap.add_argument("--dtype", default=None, help="default bfloat16 (float32 for micro)")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "loom")
    ap.add_argument(
        "--engine-threads",
        type=int,
        default=None,
        help="torch threads of every engine (default: every core but one, "
        "which the runtime thread needs)",
    )
    ap.add_argument(
        "--launch",
        choices=["batch", "each"],
        default="batch",
        help="inferlets launched as one cohort (launch_batch, as LLM.generate takes a list; "
        "default) or one launch each (as requests arriving one by one)",
    )
    ap.add_argument("--guest-threads", type=int, default=0,
                    help="threads running guests' turns (0: the runtime's default)")  # fmt: skip
    ap.add_argument("--no-instance-pool", action="store_true",
                    help="every instance maps its own memory (instance_pool off)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    gpu_like = args.engine_timing == "gpu-like"
    model = args.model or ("micro" if gpu_like else "small")
    dtype = args.dtype or ("float32" if model in ("micro", "tiny") else "bfloat16")
    step_ms = args.step_ms if gpu_like else 0.0
    levels = [int(x) for x in args.concurrency.split(",")]
    name = f"programmability_tax_{args.engine_timing}_{args.launch}.json"
    out = args.out or ROOT / "benchmarks" / "results" / name

    import torch

    from engine_throughput import model_dir
    from loom import LLM
    from loom.config import EngineConfig, RuntimeConfig
    from loom.runtime.runtime import start_runtime
    from loom.sdk.build import build_inferlet

    path = model_dir(model, args.cache)
    print("building the inferlets (cached after the first time)...", file=sys.stderr)
    py_wasm = build_inferlet(ROOT / "inferlets" / "text_completion").read_bytes()
    c_wasm = build_inferlet(ROOT / "inferlets" / "c_completion" / "app.c").read_bytes()
    threads = args.engine_threads or max(1, (os.cpu_count() or 1) - 1)
    torch.set_num_threads(threads)
    engine = dict(dtype=dtype, kv_cache_memory_mb=1024, step_time_ms=step_ms)
    llm = LLM(str(path), **engine)  # type: ignore[arg-type]
    rt = start_runtime(
        EngineConfig(model=str(path), **engine),  # type: ignore[arg-type]
        RuntimeConfig(guest_threads=args.guest_threads, instance_pool=not args.no_instance_pool),
        cache_dir=Path(tempfile.gettempdir()) / "loom-bench-programs",
        engine_threads=threads,
    )
    rows: list[dict[str, Any]] = []
    try:
        py, c = rt.add_program(py_wasm), rt.add_program(c_wasm)
        run_builtin(llm, 2, 4, -1)  # warm-up of both systems
        for mode, prog in (("fast", py), ("steps", py), ("", c)):
            run_system(rt, prog, 2, 4, mode, -1)
        # As a server after its first burst: the instance pool has had slots of the
        # largest cohort used (and freed, while (a) runs) once.
        run_system(rt, py, max(levels), 4, "fast", -2)
        runs = {"b": (py, "fast", 0), "c": (py, "steps", 0), "d": (c, "", 0)}
        keys = [k for k in args.systems if k in runs] + (["m"] if args.mixed else [])
        cohort = args.launch == "batch"
        for n in levels:
            for key in keys:
                prog, mode, extra = runs.get(key, (py, "fast", n))
                got: list[tuple[dict[str, Any], dict[str, Any]]] = []
                for r in range(args.runs):
                    seed = n * 1000 + r * 10 + keys.index(key)
                    settle(rt)
                    a = run_builtin(llm, n + extra, args.tokens, seed)
                    b = run_system(rt, prog, n, args.tokens, mode, seed, extra, cohort)
                    got.append((a, b))
                rows.append(summarize(n, key, got, args.tokens))
                print(f"  {n} concurrent, ({key}) done", file=sys.stderr)
    finally:
        rt.close()
    print_table(rows, model, dtype, args, step_ms)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "model": model,
                "step_ms": step_ms,
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


def summarize(
    n: int, key: str, got: list[tuple[dict[str, Any], dict[str, Any]]], tokens: int
) -> dict[str, Any]:
    """Medians of the paired runs' figures and of their ratios to (a)."""

    def med(f: Any) -> float:
        return statistics.median(f(a, s) for a, s in got)

    same = sum(t == w for a, s in got for t, w in zip(s["texts"], a["texts"], strict=False))
    return {
        "concurrency": n,
        "system": key,
        "a_ms_per_token": med(lambda a, s: a["wall"] / tokens * 1e3),
        "ms_per_token": med(lambda a, s: s["wall"] / tokens * 1e3),
        "ratio": med(lambda a, s: s["wall"] / a["wall"]),
        "a_tpot_ms": med(lambda a, s: a["tpot"] * 1e3),
        "tpot_ms": med(lambda a, s: s["tpot"] * 1e3),
        "tpot_ratio": med(lambda a, s: s["tpot"] / a["tpot"]),
        "a_passes": med(lambda a, s: a["passes"]),
        "passes": med(lambda a, s: s["passes"]),
        "passes_ratio": med(
            lambda a, s: (s["passes"] / s["generated"]) / (a["passes"] / a["generated"])
        ),
        "seqs_per_pass": med(lambda a, s: s["generated"] / s["passes"]),
        "idle_ms": med(lambda a, s: s["idle"] * 1e3),
        "same_text": same / sum(len(s["texts"]) for _, s in got),
    }


LAUNCHES = {"batch": "as one cohort", "each": "one by one"}


def print_table(
    rows: list[dict[str, Any]], model: str, dtype: str, args: Any, step_ms: float
) -> None:
    timing = f"gpu-like, {step_ms:g} ms per pass" if step_ms else "real"
    print(
        f"\n{model} model ({dtype}), engine timing {timing}, {args.tokens} new tokens, "
        f"greedy; inferlets launched {LAUNCHES[args.launch]}; "
        f"medians of {args.runs} paired runs, ratios to the run of (a) just before\n"
    )
    print(
        f"{'conc':>4} | {'system':<11} | {'(a) ms/tok':>10} | {'ms/tok':>14} | "
        f"{'(a) TPOT':>8} | {'TPOT ms':>14} | {'(a) passes':>10} | {'passes':>6} | "
        f"{'per token':>9} | {'seq/pass':>8} | {'idle ms':>7}"
    )
    print("-" * 128)
    for r in rows:
        print(
            f"{r['concurrency']:>4} | {SYSTEMS[r['system']]:<11} | {r['a_ms_per_token']:>10.2f} | "
            f"{r['ms_per_token']:>6.2f} ({r['ratio']:>4.2f}x) | {r['a_tpot_ms']:>8.2f} | "
            f"{r['tpot_ms']:>6.2f} ({r['tpot_ratio']:>4.2f}x) | {r['a_passes']:>10.0f} | "
            f"{r['passes']:>6.0f} | {r['passes_ratio']:>8.3f}x | {r['seqs_per_pass']:>8.1f} | "
            f"{r['idle_ms']:>7.1f}"
        )
    print(
        "\nshare of completions equal to (a)'s: "
        + ", ".join(f"{r['concurrency']} {r['system']}: {r['same_text']:.0%}" for r in rows)
    )
    print(
        "targets: passes per token <= 1.03x (a)'s; gpu-like TPOT <= 1.05x (fast path), "
        "<= 1.10x (decode_step) at 32 and 128"
    )


if __name__ == "__main__":
    main()
