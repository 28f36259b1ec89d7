"""Prefill and decode throughput of Loom's engine vs Hugging Face ``generate``, side by side.

Same random weights (Llama architecture, bfloat16), same 128-token prompts, greedy, 128
new tokens. Each (model, batch) cell alternates Loom and HF runs and reports medians:

  prefill tok/s = batch * prompt_len / time(max_tokens=1)
  decode  tok/s = batch * (new_tokens - 1) / (time(max_tokens=new_tokens) - time(max_tokens=1))

It also measures memory copy bandwidth and reports the batch-1 decode floor
(weight bytes / bandwidth) and how far each system is from it.

    python benchmarks/engine_throughput.py                       # all models, batches 1 8 32
    python benchmarks/engine_throughput.py --models small --runs 5
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

MODELS: dict[str, dict[str, Any]] = {
    # ~0.1M: one narrow layer. For the constant-step-time engine mode, where the real
    # compute of a pass of 128 sequences must stay well inside the padded step.
    "micro": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    ),
    # ~1.2M parameters: the embedded default's shape.
    "tiny": {},
    # ~41.6M: hidden 512, 8 layers, vocab 32000, tied embeddings.
    "small": dict(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        vocab_size=32000,
    ),
    # ~349M: hidden 1024, 24 layers, vocab 32000, untied embeddings.
    "medium": dict(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=32000,
        tie_word_embeddings=False,
    ),
}


def copy_bandwidth_gbs(mib: int = 256, repeats: int = 7) -> float:
    """Read+write bytes per second of a large tensor copy (median)."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


def model_dir(name: str, cache: Path) -> Path:
    from loom.models.tiny import TINY_VERSION, make_tiny_model

    # The directory name carries the config, so a changed shape never reuses old weights.
    key = hashlib.sha256(json.dumps(MODELS[name], sort_keys=True).encode()).hexdigest()[:8]
    out = cache / f"bench-{name}-{TINY_VERSION}-{key}"
    if not (out / "config.json").exists():
        print(f"making the {name} model in {out} ...", flush=True)
        make_tiny_model(out, seed=0, config_overrides=MODELS[name], dtype=torch.bfloat16)
    return out


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_cell(
    llm: Any, hf: Any, batch: int, prompt_len: int, new: int, runs: int, vocab: int
) -> dict[str, float]:
    from loom import SamplingParams

    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(10, vocab, (batch, prompt_len), generator=g)
    lists = prompts.tolist()
    mask = torch.ones_like(prompts)

    def loom(n: int) -> float:
        p = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        return timed(lambda: llm.generate(lists, p))

    def ref(n: int) -> float:
        kw = dict(
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
        with torch.inference_mode():
            return timed(lambda: hf.generate(prompts, **kw))

    loom(2), ref(2)  # warm-up
    samples: dict[str, list[float]] = {k: [] for k in ("lp", "ld", "hp", "hd", "rp", "rd")}
    for _ in range(runs):
        # Interleaved so both systems see the same machine state; the machine is noisy,
        # so each run's Loom/HF ratio is kept and the median ratio reported.
        lt1, ht1, ltn, htn = loom(1), ref(1), loom(new), ref(new)
        lp, hp = batch * prompt_len / lt1, batch * prompt_len / ht1
        ld = batch * (new - 1) / max(ltn - lt1, 1e-9)
        hd = batch * (new - 1) / max(htn - ht1, 1e-9)
        for key, value in (
            ("lp", lp),
            ("ld", ld),
            ("hp", hp),
            ("hd", hd),
            ("rp", lp / hp),
            ("rd", ld / hd),
        ):
            samples[key].append(value)
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "loom_prefill": med["lp"],
        "loom_decode": med["ld"],
        "hf_prefill": med["hp"],
        "hf_decode": med["hd"],
        "prefill_ratio": med["rp"],
        "decode_ratio": med["rd"],
        "decode_ratio_runs": samples["rd"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3, help="runs per cell; medians are reported")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "loom")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/engine_throughput.json"))
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from loom import LLM
    from loom.models.info import model_info

    bandwidth = copy_bandwidth_gbs()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"copy bandwidth {bandwidth:.1f} GB/s (read+write)"
    )
    rows = []
    for name in args.models:
        path = model_dir(name, args.cache)
        info = model_info(path)
        llm = LLM(
            str(path),
            dtype="bfloat16",
            enable_prefix_caching=False,
            max_num_batched_tokens=max(args.batches) * args.prompt_len,
            kv_cache_memory_mb=2048,
        )
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
        weight_bytes = info["num_params"] * 2
        floor_tok_s = bandwidth * 1e9 / weight_bytes  # batch-1 decode tokens/s at the floor
        for batch in args.batches:
            cell = bench_cell(
                llm, hf, batch, args.prompt_len, args.new_tokens, args.runs, info["vocab_size"]
            )
            row = {
                "model": name,
                "params": info["num_params"],
                "batch": batch,
                **cell,
                "floor_decode_tok_s": floor_tok_s * batch,
                "loom_decode_vs_floor": cell["loom_decode"] / (floor_tok_s * batch),
            }
            rows.append(row)
            print(
                f"  {name} b={batch}: decode loom {cell['loom_decode']:.0f} "
                f"hf {cell['hf_decode']:.0f} tok/s",
                flush=True,
            )
        del llm, hf

    header = (
        f"{'model':<7}{'params':>8}{'batch':>6}{'prefill loom':>13}{'prefill HF':>11}"
        f"{'ratio':>7}{'decode loom':>12}{'decode HF':>10}{'ratio':>7}"
        f"{'floor':>8}{'of floor':>9}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(
            f"{r['model']:<7}{r['params'] / 1e6:>7.1f}M{r['batch']:>6}"
            f"{r['loom_prefill']:>13.0f}{r['hf_prefill']:>11.0f}{r['prefill_ratio']:>6.2f}x"
            f"{r['loom_decode']:>12.0f}{r['hf_decode']:>10.0f}{r['decode_ratio']:>6.2f}x"
            f"{r['floor_decode_tok_s']:>8.0f}{r['loom_decode_vs_floor']:>8.0%}"
        )
    print(
        f"(tokens/s: medians of {args.runs} interleaved runs; ratio: median of per-run "
        "Loom/HF ratios; floor: decode tok/s if a step only streamed the weights once at "
        "the copy bandwidth, which ignores compute and is loose beyond batch 1)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "copy_bandwidth_gbs": bandwidth,
                "prompt_len": args.prompt_len,
                "new_tokens": args.new_tokens,
                "runs": args.runs,
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
