"""Serving through the front door: one chat turn per request, side by side in one run,
(a) as ``POST /v1/chat/completions`` (the OpenAI API, non-streaming) and (b) as an
inferlet over the WebSocket protocol (``inferlets/chat``: launch, wait for the reply).

A real ``loom serve`` process (engine worker in its own process) on 127.0.0.1; closed-loop
clients in this process: each client sends its next request when the last one is
answered. Every request has its own prompt (no prefix-cache hits between requests beyond
the chat template's first page), greedy, ``--tokens`` output tokens, end-of-sequence
ignored. Requests/s and p50/p99 latency per concurrency level; medians of ``--runs`` runs,
interleaved across the two paths.

    python benchmarks/serving.py [--model tiny] [--concurrency 1,8,32] [--requests 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(model: str, port: int, extra: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "loom", "serve", "--model", model, "--port", str(port), *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read().decode()}")  # type: ignore[union-attr]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("the server did not start")


def message(i: int) -> str:
    return f"Request {i}: tell me a story about the river and the old mill, please."


async def run_chat(url: str, model: str, conc: int, total: int, tokens: int) -> list[float]:
    import httpx

    latencies: list[float] = []
    counter = iter(range(total))
    async with httpx.AsyncClient(base_url=url, timeout=600,
                                 limits=httpx.Limits(max_connections=conc)) as http:  # fmt: skip

        async def client() -> None:
            for i in counter:
                t0 = time.perf_counter()
                r = await http.post("/v1/chat/completions", json={
                    "model": model, "max_tokens": tokens, "temperature": 0,
                    "ignore_eos": True, "messages": [{"role": "user", "content": message(i)}],
                })  # fmt: skip
                r.raise_for_status()
                assert r.json()["usage"]["completion_tokens"] == tokens
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(client() for _ in range(conc)))
    return latencies


async def run_inferlets(url: str, program: str, conc: int, total: int, tokens: int) -> list[float]:
    from loom.client import Client

    latencies: list[float] = []
    counter = iter(range(total))

    async def client() -> None:
        async with await Client.connect(url) as c:
            for i in counter:
                t0 = time.perf_counter()
                inst = await c.launch(program, [message(i), str(tokens), "ignore"])
                reply = await inst.recv()
                status = await inst.wait()
                assert status.ok and reply, status.error
                latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(client() for _ in range(conc)))
    return latencies


def summarize(wall: float, lat: list[float]) -> dict[str, float]:
    lat = sorted(lat)
    return {
        "rps": len(lat) / wall,
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests", type=int, default=32, help="requests per run and level")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serving.json"))
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]

    from loom.client import SyncClient
    from loom.sdk.build import build_inferlet

    wasm = build_inferlet(ROOT / "inferlets" / "chat" / "app.py").read_bytes()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(args.model, port)
    try:
        with SyncClient(url) as c:
            program = c.upload(wasm)
        import httpx

        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        # Warm-up: first requests pay one-off costs (instantiation caches, allocator).
        asyncio.run(run_chat(url, model, 4, 8, args.tokens))
        asyncio.run(run_inferlets(url, program, 4, 8, args.tokens))
        samples: dict[tuple[str, int], list[dict[str, float]]] = {}
        for run in range(args.runs):
            for conc in levels:
                for path in ("openai", "inferlet"):
                    t0 = time.perf_counter()
                    if path == "openai":
                        lat = asyncio.run(run_chat(url, model, conc, args.requests, args.tokens))
                    else:
                        lat = asyncio.run(run_inferlets(url, program, conc, args.requests,
                                                        args.tokens))  # fmt: skip
                    s = summarize(time.perf_counter() - t0, lat)
                    samples.setdefault((path, conc), []).append(s)
                    print(f"run {run + 1}: {path:<8} c={conc:<3} {s['rps']:7.1f} req/s "
                          f"p50 {s['p50_ms']:7.1f} ms p99 {s['p99_ms']:7.1f} ms",
                          file=sys.stderr)  # fmt: skip
    finally:
        server.terminate()
        server.wait(30)

    rows = []
    print(f"\nmodel {args.model}, {args.tokens} output tokens per request, {args.requests} "
          f"requests per run, medians of {args.runs} runs")  # fmt: skip
    print(f"{'clients':>7} | {'path':<22} | {'req/s':>7} | {'p50 ms':>8} | {'p99 ms':>8} | "
          f"{'req/s vs API':>12}")  # fmt: skip
    for conc in levels:
        base = statistics.median(s["rps"] for s in samples[("openai", conc)])
        for path, label in (("openai", "/v1/chat/completions"), ("inferlet", "inferlet over WS")):
            ss = samples[(path, conc)]
            row = {
                "clients": conc,
                "path": path,
                "rps": statistics.median(s["rps"] for s in ss),
                "p50_ms": statistics.median(s["p50_ms"] for s in ss),
                "p99_ms": statistics.median(s["p99_ms"] for s in ss),
                "runs": ss,
            }
            row["rps_vs_api"] = row["rps"] / base
            rows.append(row)
            print(f"{conc:>7} | {label:<22} | {row['rps']:7.1f} | {row['p50_ms']:8.1f} | "
                  f"{row['p99_ms']:8.1f} | {row['rps_vs_api']:11.2f}x")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "tokens": args.tokens,
                               "requests": args.requests, "rows": rows}, indent=2))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
