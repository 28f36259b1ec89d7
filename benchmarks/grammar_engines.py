"""llguidance against xgrammar on this machine: the figures the grammar engine was chosen by.

Per engine and model vocabulary (the tiny and small models' byte-level BPE tokenizers):
time to build the engine's tokenizer index (once per server), time to compile a
realistic JSON schema (once per request), and mask time per token along a constrained
walk (every step: compute the allowed-token bitmask, pick a random allowed token, advance
the matcher — what the host does per generated token). Installed size from the wheel
files on disk.

    python benchmarks/grammar_engines.py [--walks 20] [--steps 96]

xgrammar is optional (``pip install --no-deps xgrammar``: its declared dependencies
include triton and a CUDA torch); without it only llguidance is measured. Writes
``benchmarks/results/grammar_engines.json``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from engine_throughput import model_dir  # noqa: E402
from loom.paths import cache_root  # noqa: E402

# A realistic tool-call argument schema: nesting, enums, arrays, required fields, bounds.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.[a-z]{2,3}$"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "city": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address"],
    "additionalProperties": False,
}


def installed_mb(dist: str) -> float:
    files = importlib.metadata.distribution(dist).files or []
    return sum((f.locate().stat().st_size for f in files if Path(f.locate()).exists()), 0) / 1e6


def walk_llguidance(tok: Any, vocab: int, walks: int, steps: int) -> dict[str, float]:
    import llguidance

    from loom.engine.grammar import fill_bitmask, new_bitmask

    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    compile_s = []
    for _ in range(5):
        t = time.perf_counter()
        llguidance.LLMatcher(tok, grammar)
        compile_s.append(time.perf_counter() - t)
    bitmask = new_bitmask(1, vocab)
    mask_s: list[float] = []
    rng = random.Random(0)
    for _ in range(walks):
        m = llguidance.LLMatcher(tok, grammar)
        for _ in range(steps):
            t = time.perf_counter()
            fill_bitmask(m, bitmask, 0)
            mask_s.append(time.perf_counter() - t)
            allowed = allowed_ids(bitmask, vocab)
            if not allowed or m.is_stopped():
                break
            m.consume_token(rng.choice(allowed))
    return {"compile_ms": 1e3 * statistics.median(compile_s), **_mask_stats(mask_s)}


def walk_xgrammar(hf_tok: Any, vocab: int, walks: int, steps: int) -> dict[str, float]:
    import xgrammar as xgr

    t = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(hf_tok, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    index_s = time.perf_counter() - t
    compile_s = []
    for _ in range(5):
        t = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(SCHEMA))
        compile_s.append(time.perf_counter() - t)
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    mask_s: list[float] = []
    rng = random.Random(0)
    for _ in range(walks):
        m = xgr.GrammarMatcher(compiled)
        for _ in range(steps):
            t = time.perf_counter()
            m.fill_next_token_bitmask(bitmask, 0)
            mask_s.append(time.perf_counter() - t)
            allowed = allowed_ids(bitmask, vocab)
            if not allowed or m.is_terminated():
                break
            m.accept_token(rng.choice(allowed))
    return {"index_s": index_s, "compile_ms": 1e3 * statistics.median(compile_s),
            **_mask_stats(mask_s)}  # fmt: skip


def allowed_ids(bitmask: torch.Tensor, vocab: int) -> list[int]:
    """Allowed ids of the first row of a packed int32 bitmask."""
    from loom.engine.grammar import allowed

    return allowed(bitmask[:1], vocab)[0].nonzero().flatten().tolist()


def _mask_stats(mask_s: list[float]) -> dict[str, float]:
    mask_s.sort()
    return {
        "mask_us_p50": 1e6 * mask_s[len(mask_s) // 2],
        "mask_us_p99": 1e6 * mask_s[int(len(mask_s) * 0.99)],
        "mask_us_mean": 1e6 * statistics.fmean(mask_s),
        "steps": len(mask_s),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--walks", type=int, default=20)
    ap.add_argument("--steps", type=int, default=96)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/grammar_engines.json"))
    args = ap.parse_args()
    import llguidance
    from transformers import PreTrainedTokenizerFast

    from loom.models.tokenizer import Tokenizer

    try:
        import xgrammar  # noqa: F401

        have_xgr = True
    except ImportError:
        have_xgr = False
    rows: list[dict[str, Any]] = []
    for name in ("tiny", "small"):
        path = model_dir(name, cache_root() / "bench-models")
        vocab = json.loads((path / "config.json").read_text())["vocab_size"]
        tok = Tokenizer.from_dir(path)
        t = time.perf_counter()
        ll_tok = llguidance.LLTokenizer(
            tok._tok.to_str(), n_vocab=vocab, eos_token=list(tok.eos_token_ids)
        )
        index_s = time.perf_counter() - t
        row = walk_llguidance(ll_tok, vocab, args.walks, args.steps)
        rows.append({"engine": "llguidance", "model": name, "vocab": vocab,
                     "index_s": index_s, **row})  # fmt: skip
        if have_xgr:
            hf = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"),
                                         eos_token="</s>")  # fmt: skip
            row = walk_xgrammar(hf, vocab, args.walks, args.steps)
            rows.append({"engine": "xgrammar", "model": name, "vocab": vocab, **row})
    sizes = {"llguidance": installed_mb("llguidance")}
    if have_xgr:
        sizes["xgrammar"] = installed_mb("xgrammar")
    print(f"{'engine':<11} {'model':<6} {'vocab':>6} {'index s':>8} {'compile ms':>11} "
          f"{'mask µs p50':>12} {'p99':>8} {'mean':>8}")  # fmt: skip
    for r in rows:
        print(f"{r['engine']:<11} {r['model']:<6} {r['vocab']:>6} {r['index_s']:>8.2f} "
              f"{r['compile_ms']:>11.2f} {r['mask_us_p50']:>12.1f} {r['mask_us_p99']:>8.1f} "
              f"{r['mask_us_mean']:>8.1f}")  # fmt: skip
    print("installed MB:", {k: round(v, 1) for k, v in sizes.items()})
    Path(args.out).write_text(json.dumps({"rows": rows, "installed_mb": sizes}, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
