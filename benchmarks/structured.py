"""Structured output: what a grammar costs per token, and constrained against free
generation through the OpenAI API at 1 and 32 concurrent requests, side by side.

Two figures:

* **mask time per token**: ``SamplingStates.apply`` + ``advance`` (the work the engine
  adds to a constrained row of a pass: the llguidance mask, applying it to the logits,
  taking the sampled token), measured in this process on the model's vocabulary along
  random walks through the benchmark's schema, for 1 and 32 rows a pass;
* **slowdown**: a real ``loom serve`` process; every request generates exactly
  ``--tokens`` tokens, constrained (``response_format`` with a JSON schema no output of
  that length can complete: an array of records with keys, enums, bounded integers and
  strings, so every token is masked by a realistic grammar state) or free (the same
  prompt, ``ignore_eos``). The two alternate for ``--rounds`` rounds; slowdown = the
  median of (constrained time / free time) over the rounds.

    python benchmarks/structured.py [--model small] [--concurrency 1,32] [--tokens 128]

Writes ``benchmarks/results/structured.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

RECORD = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 99999},
        "name": {"type": "string", "maxLength": 16},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["id", "name", "role", "tags", "active"],
    "additionalProperties": False,
}
# No output of a few hundred tokens completes this: every request runs to max_tokens.
SCHEMA = {"type": "array", "items": RECORD, "minItems": 200}


def mask_cost(model_path: Path, rows: int, steps: int) -> dict[str, float]:
    """µs per constrained row and token of masking and advancing, ``rows`` rows a pass."""
    import torch

    from loom.engine.grammar import GrammarCompiler
    from loom.engine.sampling_state import SamplingStates, StateSpec
    from loom.models.tokenizer import Tokenizer

    vocab = json.loads((model_path / "config.json").read_text())["vocab_size"]
    tok = Tokenizer.from_dir(model_path)
    text = GrammarCompiler(tok, vocab).compile("json_schema", SCHEMA)
    matchers = SamplingStates(tok, vocab)
    for i in range(rows):
        matchers.start(StateSpec(i, text))
    rng = random.Random(0)
    spent = 0.0
    for _ in range(steps):
        logits = torch.randn(rows, vocab)
        t = time.perf_counter()
        matchers.apply(logits, [(i, i) for i in range(rows)])
        # Sample among the allowed ids (random weights: any allowed token will do).
        picks = [rng.choice(torch.isfinite(row).nonzero().flatten().tolist()) for row in logits]
        t2 = time.perf_counter()
        for i, p in enumerate(picks):
            matchers.advance(i, p)
        spent += (t2 - t) + (time.perf_counter() - t2)
    return {"rows": rows, "us_per_row_token": 1e6 * spent / (rows * steps)}


async def run_requests(url: str, model: str, conc: int, tokens: int, constrained: bool) -> float:
    import httpx

    body: dict[str, Any] = {
        "model": model, "max_tokens": tokens, "temperature": 1.0, "seed": 0,
        "messages": [{"role": "user", "content": "List the users as JSON records."}],
    }  # fmt: skip
    if constrained:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "users", "schema": SCHEMA}}  # fmt: skip
    else:
        body["ignore_eos"] = True
    async with httpx.AsyncClient(base_url=url, timeout=600,
                                 limits=httpx.Limits(max_connections=conc)) as http:  # fmt: skip

        async def one(i: int) -> None:
            r = await http.post("/v1/chat/completions", json={**body, "seed": i})
            r.raise_for_status()
            got = r.json()
            assert got["usage"]["completion_tokens"] == tokens, got["usage"]
            if constrained:
                text = got["choices"][0]["message"]["content"]
                assert text.startswith("["), text[:200]

        t = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(conc)))
        return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="small", help="small (~40M) or tiny")
    ap.add_argument("--concurrency", default="1,32")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/structured.json"))
    args = ap.parse_args()
    from engine_throughput import model_dir
    from loom.paths import cache_root
    from serving import free_port, start_server

    path = model_dir(args.model, cache_root() / "bench-models")
    masks = [mask_cost(path, rows, 64) for rows in (1, 32)]
    for m in masks:
        print(f"mask + advance: {m['us_per_row_token']:.1f} µs per row and token "
              f"({m['rows']} rows a pass)")  # fmt: skip
    port = free_port()
    proc = start_server(str(path), port, ("--num-pages", "4096"))
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        import httpx

        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        for conc in (int(c) for c in args.concurrency.split(",")):
            asyncio.run(run_requests(url, model, conc, 8, True))  # warm both paths
            asyncio.run(run_requests(url, model, conc, 8, False))
            free_s, cons_s = [], []
            for _ in range(args.rounds):
                free_s.append(asyncio.run(run_requests(url, model, conc, args.tokens, False)))
                cons_s.append(asyncio.run(run_requests(url, model, conc, args.tokens, True)))
            ratios = [c / f for c, f in zip(cons_s, free_s, strict=True)]
            n = conc * args.tokens
            row = {
                "concurrency": conc, "tokens": args.tokens,
                "free_tokens_per_s": n / statistics.median(free_s),
                "constrained_tokens_per_s": n / statistics.median(cons_s),
                "slowdown": statistics.median(ratios), "ratios": ratios,
            }  # fmt: skip
            rows.append(row)
            print(f"{conc:>3} concurrent: free {row['free_tokens_per_s']:8.1f} tok/s, "
                  f"constrained {row['constrained_tokens_per_s']:8.1f} tok/s, "
                  f"slowdown {100 * (row['slowdown'] - 1):+.1f} %")  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(30)
    out = {"model": args.model, "mask": masks, "rows": rows, "schema": SCHEMA}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
