"""Batching policies side by side: 64 concurrent text-completion inferlets per run.

Each inferlet (the componentize-py test guest, mode ``complete``) tokenizes its prompt,
prefills it with one forward call and then makes one forward call per generated token,
waiting for each result: the pattern whose batching the policies decide. For every
policy the same 64 prompts run ``--repeats`` times on a fresh runtime (process engine
worker, as the server runs it); the table shows medians over the repeats.

- throughput: generated tokens / wall time of the run
- latency: mean over inferlets of launch -> result
- batch: mean forward commands per engine batch

    python benchmarks/batching_policies.py [--guests 64] [--tokens 32] [--repeats 3]
        [--k 32] [--t-ms 8] [--policies adaptive,k,t,k_or_t]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TEXT = "the quiet river carried small boats past the old mill while children watched"
WORDS = TEXT.split(" ")


def prompts(n: int) -> list[str]:
    """Prompts of 4-24 words, different for every guest."""
    return [
        " ".join(WORDS[(i + j) % len(WORDS)] for j in range(4 + (i * 7) % 21)) for i in range(n)
    ]


def one_run(rt: Any, program: str, texts: list[str], tokens: int) -> dict[str, float]:
    from loom.runtime.runtime import RuntimeStats

    rt.query(lambda: setattr(rt, "stats", RuntimeStats()))
    t0 = time.perf_counter()
    handles = [rt.launch(program, ["complete", text, str(tokens)]) for text in texts]
    results = [h.wait(1800) for h in handles]
    wall = max(h.finished_at or 0.0 for h in handles) - t0
    failed = [r.error for r in results if not r.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} inferlets failed, first: {failed[0]}")
    latencies = [(h.finished_at or 0.0) - h.launched_at for h in handles]
    outputs = [h.recv(5) for h in handles]
    assert all(isinstance(o, str) for o in outputs)
    s = rt.stats
    return {
        "throughput_tok_s": len(texts) * tokens / wall,
        "mean_latency_ms": statistics.fmean(latencies) * 1e3,
        "mean_batch": s.forward_cmds / max(1, s.batches),
        "batches": float(s.batches),
        "wall_s": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--guests", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32, help="tokens generated per inferlet")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--k", type=int, default=32, help="batch size of the k policies")
    ap.add_argument("--t-ms", type=float, default=8.0, help="wait of the t policies")
    ap.add_argument("--policies", default="adaptive,k,t,k_or_t")
    ap.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "batching_policies.json"
    )
    args = ap.parse_args()

    from loom.config import EngineConfig, RuntimeConfig
    from loom.models.tiny import ensure_tiny_model
    from loom.runtime.runtime import start_runtime
    from loom.sdk.build import build_inferlet

    print("building the Python test inferlet (cached after the first time)...", file=sys.stderr)
    wasm = build_inferlet(ROOT / "tests" / "runtime" / "guests" / "testkit", sdk=False).read_bytes()
    texts = prompts(args.guests)
    rows: list[dict[str, Any]] = []
    for policy in args.policies.split(","):
        config = RuntimeConfig(
            batch_policy=policy,  # type: ignore[arg-type]
            batch_k=args.k,
            batch_t_ms=args.t_ms,
            page_wait_timeout_s=600,
        )
        rt = start_runtime(
            EngineConfig(model=str(ensure_tiny_model()), num_pages=args.guests * 4 + 64),
            config,
            cache_dir=Path(tempfile.gettempdir()) / "loom-bench-programs",
        )
        try:
            program = rt.add_program(wasm)
            one_run(rt, program, texts[:4], 4)  # warm-up: instantiation and first steps
            runs = [one_run(rt, program, texts, args.tokens) for _ in range(args.repeats)]
        finally:
            rt.close()
        row: dict[str, Any] = {"policy": policy, "runs": runs}
        for key in runs[0]:
            row[key] = statistics.median(r[key] for r in runs)
        rows.append(row)
        print(f"  {policy} done", file=sys.stderr)

    base = next((r for r in rows if r["policy"] == "adaptive"), rows[0])
    print(f"\n{args.guests} text-completion inferlets x {args.tokens} tokens, medians of "
          f"{args.repeats} runs (k={args.k}, t={args.t_ms:g} ms)\n")  # fmt: skip
    print(f"{'policy':>8} | {'tok/s':>8} | {'vs adaptive':>11} | {'latency ms':>10} | "
          f"{'vs adaptive':>11} | {'batch':>6} | {'batches':>7}")  # fmt: skip
    print("-" * 80)
    for r in rows:
        print(
            f"{r['policy']:>8} | {r['throughput_tok_s']:>8.0f} | "
            f"{r['throughput_tok_s'] / base['throughput_tok_s']:>10.2f}x | "
            f"{r['mean_latency_ms']:>10.0f} | "
            f"{r['mean_latency_ms'] / base['mean_latency_ms']:>10.2f}x | "
            f"{r['mean_batch']:>6.1f} | {r['batches']:>7.0f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows},
                                   indent=2))  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
