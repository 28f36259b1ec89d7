"""Streaming as a reader feels it: N concurrent OpenAI completion streams against a real
``loom serve`` process; time to first token and inter-token latency (p50 / p99, over every
gap between content chunks of every stream), and the median time per output token.

Smooth streaming means each token leaves the server in the pass that produced it: the
inter-token p99 stays within a small multiple of the median time per output token,
instead of a generation chunk's tokens arriving together. ``--engine-step-ms`` pads every
engine pass to that wall time (the constant-step-time mode, as a GPU step behaves).

On a CPU a pass that admits a new request's prefill takes longer than a decode pass, so
the real-time gaps are uneven while requests arrive; ``--model micro --engine-step-ms 10``
shows what the delivery path alone adds (every pass the same length, as on a GPU).

    python benchmarks/streaming.py [--model tiny|micro|small] [--concurrency 32] \\
        [--tokens 64] [--runs 3] [--engine-step-ms 0]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


async def one_stream(http: Any, model: str, i: int, tokens: int) -> tuple[float, list[float]]:
    """(time to first token, arrival times of every content chunk) of one stream."""
    t0 = time.perf_counter()
    arrivals: list[float] = []
    body = {
        "model": model,
        "prompt": f"Request {i}: the river and the old mill",
        "stream": True,
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    async with http.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            content = line.startswith("data: ") and line != "data: [DONE]"
            if content and json.loads(line[6:])["choices"][0]["text"]:
                arrivals.append(time.perf_counter())
    return arrivals[0] - t0, arrivals


async def run(url: str, model: str, conc: int, tokens: int) -> dict[str, float]:
    import httpx

    async with httpx.AsyncClient(
        base_url=url, timeout=600, limits=httpx.Limits(max_connections=conc)
    ) as http:
        got = await asyncio.gather(*(one_stream(http, model, i, tokens) for i in range(conc)))
    ttft = sorted(t for t, _ in got)
    gaps = sorted(b - a for _, ts in got for a, b in itertools.pairwise(ts))
    tpot = statistics.median((ts[-1] - ts[0]) / (len(ts) - 1) for _, ts in got if len(ts) > 1)

    def pct(xs: list[float], q: float) -> float:
        return 1000 * xs[min(len(xs) - 1, int(q * len(xs)))]

    return {
        "ttft_p50_ms": pct(ttft, 0.5),
        "ttft_p99_ms": pct(ttft, 0.99),
        "itl_p50_ms": pct(gaps, 0.5),
        "itl_p99_ms": pct(gaps, 0.99),
        "tpot_ms": 1000 * tpot,
        "itl_p99_vs_tpot": pct(gaps, 0.99) / (1000 * tpot),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny (embedded), micro or small")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--engine-step-ms", type=float, default=0.0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "streaming.json"))
    args = ap.parse_args()
    import httpx

    from serving import free_port, start_server

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    extra = ("--engine-step-ms", str(args.engine_step_ms)) if args.engine_step_ms else ()
    from engine_throughput import model_dir

    cache = Path.home() / ".cache" / "loom"
    path = args.model if args.model == "tiny" else str(model_dir(args.model, cache))
    server = start_server(path, port, extra)
    try:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        asyncio.run(run(url, model, 4, 8))  # warm-up
        runs = [
            asyncio.run(run(url, model, args.concurrency, args.tokens)) for _ in range(args.runs)
        ]
    finally:
        server.terminate()
        server.wait(30)
    row = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(
        f"\nmodel {args.model}, {args.concurrency} concurrent streams of {args.tokens} tokens, "
        f"engine step {args.engine_step_ms or 'real'} ms; medians of {args.runs} runs"
    )
    print(" | ".join(f"{k} {v:.2f}" for k, v in row.items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "median": row, "runs": runs}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
