"""The CUDA path in one run (under 5 minutes on one GPU): parity, decode, prefill, and the
programmability tax, as a table and JSON.

- parity: greedy float32 tokens of every family (random small models) against
  ``transformers`` on the same device; for the main shape in bfloat16, the share of
  identical tokens;
- decode: ``LLM.generate`` of 128-token prompts, 128 new tokens, greedy, at each batch:
  ms per step = (time(128 new) - time(1 new)) / 127, output tokens per second;
- prefill: 4 prompts of 2048 tokens, one new token: model FLOPs per second over the
  measured bf16 matmul rate of this device (MFU);
- attention: one layer's decode attention, the Triton kernel against gathering the pages
  and SDPA, at batch 1 and 64 over 256 and 2048 keys (``gpu_attention.py``);
- decode_eager, decode_unfused, decode_no_lookahead: the same at batch 1 and 64 with CUDA
  graphs off, with the fused Triton ops off (``LOOM_TRITON_OPS=0``), and with lookahead
  off (each step read back before the next is scheduled): what each saves;
- gpu_busy: share of the wall time the GPU runs kernels over 32 decode steps (profiler);
- tax: 1 and 32 concurrent Python inferlets on the host fast path (``ctx.generate``)
  against the built-in scheduler, each run right after one of its own (ms/token ratio);
- attention_flex: the same attention by PyTorch's FlexAttention over the same pages (the
  alternative the kernel was chosen against), against the gather, last of all.

Each part that fails is recorded under ``errors`` and the rest still runs; the JSON, with
its ``summary`` of the acceptance figures, is rewritten after every part, so a run cut short
keeps what it measured. The acceptance figures' parts (parity, the main model's decode
and prefill, the tax) run before the diagnostics (attention, the decode variants, the tax
without the instance pool, FlexAttention).

The main shape is Llama-3.2-1B's (hidden 2048, 16 layers, 32 heads, 8 KV heads, vocab
128,256, tied embeddings) with random bf16 weights, made once in ``--cache``. A dry run on
a CPU: ``--device cpu --shape small --batches 1,4 --prefill 2x256 --tax 1,4 --quick``.

    python benchmarks/gpu.py [--device cuda] [--out benchmarks/results/gpu.json]
        [--inferlet text_completion.wasm]   (built beforehand: no componentize-py needed)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from engine_throughput import MODELS, model_dir  # noqa: E402
from gpu_attention import attention, timed  # noqa: E402

MODELS.setdefault("1b", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                             num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                             vocab_size=128256, tie_word_embeddings=True))  # fmt: skip


def matmul_tflops(device: str, n: int) -> float:
    """The device's bf16 matmul rate on ``n``×``n`` operands (median of 10)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = [timed(device, lambda: a @ b) for _ in range(10)]
    return 2 * n**3 / statistics.median(times) / 1e12


def parity(device: str, cache: Path, new: int) -> dict[str, bool]:
    """Greedy float32 tokens equal to ``transformers``' for every family."""
    from tests.model_factory import FAMILIES, make_hf_model

    from loom import LLM, SamplingParams
    from loom.models.tiny import make_tiny_model

    root = Path(tempfile.mkdtemp(prefix="loom-gpu-parity-"))
    tok = make_tiny_model(root / "tok")
    g = torch.Generator().manual_seed(7)
    prompts = [
        [0, *torch.randint(10, 2048, (k - 1,), generator=g).tolist()] for k in (3, 17, 33, 50)
    ]
    out = {}
    for fam in FAMILIES:
        hf = make_hf_model(fam, root / fam, vocab_size=2048, tokenizer_from=tok).to(device)
        want = []
        for prompt in prompts:  # one at a time, stopping at EOS, as the CPU parity tests do
            with torch.inference_mode():
                ref = hf.generate(torch.tensor([prompt], device=device), max_new_tokens=new,
                                  do_sample=False)  # fmt: skip
            want.append(ref[0, len(prompt) :].tolist())
        llm = LLM(str(root / fam), dtype="float32", device=device, num_pages=256)
        got = llm.generate(prompts, SamplingParams(max_tokens=new, temperature=0.0))
        out[fam] = [list(o.token_ids) for o in got] == want
        print(f"  parity {fam}: {'equal' if out[fam] else 'DIFFERENT'}", file=sys.stderr)
        del hf, llm
    return out


def bf16_share(llm: Any, path: Path, device: str, new: int) -> float:
    """Share of positions where Loom's bf16 greedy tokens equal ``transformers``'."""
    import transformers as tf

    from loom import SamplingParams

    prompts = [list(range(100 + 50 * i, 228 + 50 * i)) for i in range(4)]
    hf = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device)
    refs = []
    for prompt in prompts:  # both stop at EOS; positions past the shorter are not compared
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([prompt], device=device), max_new_tokens=new,
                              do_sample=False)  # fmt: skip
        refs.append(ref[0, len(prompt) :].tolist())
    del hf
    got = llm.generate(prompts, SamplingParams(max_tokens=new, temperature=0.0))
    pairs = [(a, b) for r, o in zip(refs, got, strict=True)
             for a, b in zip(r, o.token_ids, strict=False)]  # fmt: skip
    return sum(a == b for a, b in pairs) / max(1, len(pairs))


def decode(llm: Any, device: str, batch: int, vocab: int, new: int, runs: int) -> dict[str, float]:
    from loom import SamplingParams

    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(10, min(vocab, 30000), (batch, 128), generator=g).tolist()

    def run(n: int) -> float:
        p = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        return timed(device, lambda: llm.generate(prompts, p))

    run(2)  # warm-up
    graphs = llm.engine.runner.graphs
    replays = graphs.num_replays if graphs is not None else 0
    steps = [(run(new) - run(1)) / (new - 1) for _ in range(runs)]
    ms = 1000 * statistics.median(steps)
    replayed = (graphs.num_replays if graphs is not None else 0) - replays
    return {"batch": batch, "ms_per_step": ms, "tokens_per_s": batch * 1000 / ms,
            "graph_replays": replayed}  # fmt: skip


def gpu_busy(llm: Any, batch: int, steps: int = 32) -> dict[str, float]:
    """Share of the wall time of ``steps`` decode steps the GPU spends in kernels, and
    kernels launched per step (torch.profiler; prefill and first token excluded)."""
    from torch.profiler import ProfilerActivity, profile

    from loom import SamplingParams

    prompts = [list(range(100 + i, 228 + i)) for i in range(batch)]
    p = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)
    llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0))  # warm prefix cache
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = timed("cuda", lambda: llm.generate(prompts, p))
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy_us = sum(e.device_time for e in events)
    return {"batch": batch, "busy_share": busy_us / 1e6 / t, "wall_ms_per_step": 1e3 * t / steps,
            "kernels_per_step": len(events) / steps}  # fmt: skip


def prefill(llm: Any, device: str, cfg: dict[str, Any], n: int, length: int, peak: float,
            runs: int) -> dict[str, float]:  # fmt: skip
    from loom import SamplingParams

    g = torch.Generator().manual_seed(7)
    p = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    times = []
    for r in range(runs + 1):  # new prompts every run: no prefix-cache hit
        prompts = torch.randint(10, 30000, (n, length), generator=g).tolist()
        t = timed(device, lambda prompts=prompts: llm.generate(prompts, p))
        if r:
            times.append(t)
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv, inter = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd, \
        cfg["intermediate_size"]  # fmt: skip
    per_token = 2 * layers * (h * (q + 2 * kv) + q * h + 3 * h * inter)
    # Causal attention: QK^T and PV over (on average) half the prompt, per layer. The LM
    # head runs on each prompt's last token only (one new token), so it counts once.
    attention_flops = 2 * 2 * layers * q * length / 2
    flops = n * length * (per_token + attention_flops) + n * 2 * h * cfg["vocab_size"]
    t = statistics.median(times)
    return {"tokens_per_s": n * length / t, "tflops": flops / t / 1e12,
            "mfu": flops / t / 1e12 / peak}  # fmt: skip


def tax(path: Path, device: str, dtype: str, levels: list[int], tokens: int, runs: int,
        wasm_path: Path | None = None, instance_pool: bool = True,
        ) -> dict[str, dict[int, float]]:  # fmt: skip
    """Median ms/token of the fast-path inferlets over the built-in scheduler's, with the
    guests' turns all on the runtime thread (``serial``, the default) and side by side on
    a pool of half the cores (``pool``), paired in the same runs; ``instance_pool``: new
    instances take reused slots (``RuntimeConfig.instance_pool``, the default)."""
    from loom import LLM
    from loom.config import EngineConfig, RuntimeConfig
    from loom.runtime.runtime import start_runtime
    from loom.sdk.build import build_inferlet
    from programmability_tax import run_builtin, run_system, settle

    wasm = (wasm_path or build_inferlet(ROOT / "inferlets" / "text_completion")).read_bytes()
    engine = dict(dtype=dtype, device=device, kv_cache_memory_mb=4096)
    llm = LLM(str(path), **engine)  # type: ignore[arg-type]
    rt = start_runtime(EngineConfig(model=str(path), **engine),  # type: ignore[arg-type]
                       RuntimeConfig(guest_threads=0,  # (the pool: half the cores, up to 8)
                                     instance_pool=instance_pool),
                       cache_dir=Path(tempfile.gettempdir()) / "loom-bench-programs")  # fmt: skip
    pool = rt.guests.turn_pool
    out: dict[str, dict[int, float]] = {"serial": {}, "pool": {}}
    print(f"  guest threads: {pool.threads if pool else 1}", file=sys.stderr)
    try:
        program = rt.add_program(wasm)
        run_builtin(llm, 2, 4, -1)
        run_system(rt, program, 2, 4, "fast", -1)
        run_system(rt, program, max(levels), 4, "fast", -2)  # (pooled slots used once)
        for n in levels:
            ratios: dict[str, list[float]] = {"serial": [], "pool": []}
            for r in range(runs):
                settle(rt)  # (no run is charged for freeing the stores of the one before)
                a = run_builtin(llm, n, tokens, n * 1000 + r)
                for key in ("serial", "pool"):
                    rt.guests.turn_pool = pool if key == "pool" else None
                    settle(rt)
                    b = run_system(rt, program, n, tokens, "fast", n * 1000 + r)
                    ratios[key].append(b["wall"] / a["wall"])
            rt.guests.turn_pool = pool
            for key in ratios:
                out[key][n] = statistics.median(ratios[key])
            print(f"  tax at {n}: {out['serial'][n]:.3f}x (turn pool {out['pool'][n]:.3f}x)",
                  file=sys.stderr)  # fmt: skip
    finally:
        rt.guests.turn_pool = pool
        rt.close()
    return out


def summary(data: dict[str, Any]) -> dict[str, Any]:
    """The issue's acceptance figures, from the parts run so far (None: not run)."""
    by_batch = {d["batch"]: d for d in data.get("decode") or []}
    return {
        "decode_ms_per_step_batch1": by_batch.get(1, {}).get("ms_per_step"),
        "decode_tokens_per_s_batch64": by_batch.get(64, {}).get("tokens_per_s"),
        "prefill_mfu": (data.get("prefill") or {}).get("mfu"),
        "tax_32_fast_path": (data.get("tax") or {}).get("serial", {}).get(32),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", default="1b", choices=sorted(MODELS))
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--eager-batches", default="1,64", help="decode with CUDA graphs off")
    ap.add_argument("--prefill", default="4x2048", help="prompts x tokens")
    ap.add_argument("--tax", default="1,32", help="concurrent inferlets")
    ap.add_argument("--inferlet", type=Path, help="text_completion built beforehand (.wasm)")
    ap.add_argument("--quick", action="store_true", help="one run per figure (a dry run)")
    ap.add_argument(
        "--skip", default="", help="any of parity, attention, eager, profile, tax, flex"
    )
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "loom")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu.json")
    args = ap.parse_args()
    runs = 1 if args.quick else 3
    t0 = time.perf_counter()
    from loom import LLM

    device, path = args.device, model_dir(args.shape, args.cache)
    cfg = json.loads((path / "config.json").read_text())
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    print(f"{args.shape} on {name}", file=sys.stderr)
    data: dict[str, Any] = {"device": name, "shape": args.shape, "torch": torch.__version__,
                            "errors": {}}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def part(key: str, fn: Callable[[], Any]) -> Any:
        """Run one part; a failure is recorded and the JSON kept up to date either way."""
        t = time.perf_counter()
        try:
            data[key] = fn()
        except Exception as e:  # one broken part must not lose the others' figures
            data["errors"][key] = f"{type(e).__name__}: {e}"
            print(f"  {key} FAILED: {data['errors'][key]}", file=sys.stderr)
            traceback.print_exc()
        print(f"  {key}: {time.perf_counter() - t:.1f} s", file=sys.stderr)
        data["summary"] = summary(data)  # (a run cut short still leaves its figures)
        args.out.write_text(json.dumps(data, indent=1, default=str))
        return data.get(key)

    peak = part("matmul_tflops_bf16",
                lambda: matmul_tflops(device, 8192 if name != "cpu" else 2048)) or 0.0  # fmt: skip
    if "parity" not in args.skip:
        part("parity_fp32", lambda: parity(device, args.cache, 24))

    def bf16_model() -> None:
        """The main model's parts (its engine is freed at return)."""
        t = time.perf_counter()
        llm = LLM(str(path), dtype="bfloat16", device=device, kv_cache_memory_mb=16384)
        graphs = llm.engine.runner.graphs
        data["engine_start_s"] = time.perf_counter() - t
        data["graph_buckets"] = graphs.captured if graphs is not None else []
        if "parity" not in args.skip:
            part("bf16_identical_share", lambda: bf16_share(llm, path, device, 32))
        batches = [int(b) for b in args.batches.split(",")]
        part("decode", lambda: [decode(llm, device, b, cfg["vocab_size"], 128, runs)
                                for b in batches])  # fmt: skip
        n, length = (int(x) for x in args.prefill.split("x"))
        part("prefill", lambda: prefill(llm, device, cfg, n, length, peak, runs))
        if "profile" not in args.skip and device.startswith("cuda"):
            part("gpu_busy", lambda: [gpu_busy(llm, b) for b in (1, 64)])

    # The acceptance figures first (engine, then the tax), the diagnostics after them: a run
    # cut short by its time limit loses the latter.
    part("engine", bf16_model)
    levels = [int(x) for x in args.tax.split(",")]
    if "tax" not in args.skip:
        part("tax", lambda: tax(path, device, "bfloat16", levels, 64, runs, args.inferlet))
    if "attention" not in args.skip:
        from loom.kernels import triton_decode

        kernel = device.startswith("cuda") and triton_decode.available()
        part("attention", lambda: attention(device, kernel, [1, 64], [256, 2048], flex=False))

    def variant(env: dict[str, str], lookahead: bool = True, **kw: Any) -> list[dict[str, float]]:
        """Decode at ``--eager-batches`` with other engine settings or environment."""
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            llm = LLM(str(path), dtype="bfloat16", device=device, kv_cache_memory_mb=4096, **kw)
            llm.engine.lookahead = llm.engine.lookahead and lookahead
            return [decode(llm, device, int(b), cfg["vocab_size"], 128, runs)
                    for b in args.eager_batches.split(",")]  # fmt: skip
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    if "eager" not in args.skip and args.eager_batches:
        part("decode_eager", lambda: variant({}, cuda_graphs=False))
        part("decode_unfused", lambda: variant({"LOOM_TRITON_OPS": "0"}))
        part("decode_no_lookahead", lambda: variant({}, lookahead=False))
    if "tax" not in args.skip:
        part(
            "tax_no_instance_pool",
            lambda: tax(
                path, device, "bfloat16", levels, 64, runs, args.inferlet, instance_pool=False
            ),
        )
    if "flex" not in args.skip:  # last: its compiles take the longest of the diagnostics
        part("attention_flex", lambda: attention(device, False, [1, 64], [256, 2048]))
    data["summary"] = summary(data)
    data["wall_s"] = time.perf_counter() - t0
    report(data, args.shape, name, peak, args.prefill)
    args.out.write_text(json.dumps(data, indent=1, default=str))
    print(f"wrote {args.out}")


def report(data: dict[str, Any], shape: str, name: str, peak: float, prefill_arg: str) -> None:
    start = data.get("engine_start_s", 0.0)
    print(f"\n{shape} on {name}, bf16 matmul {peak:.1f} TFLOP/s, graphs for batches "
          f"{data.get('graph_buckets')} (engine start {start:.1f} s)")  # fmt: skip
    others = [{d["batch"]: d["ms_per_step"] for d in data.get(k) or []}
              for k in ("decode_eager", "decode_unfused", "decode_no_lookahead")]  # fmt: skip
    print(f"{'batch':>6} {'ms/step':>9} {'tok/s':>10} {'no graphs':>10} {'unfused':>8} "
          f"{'no lookahead':>13}")  # fmt: skip
    for d in data.get("decode", []):
        e, u, la = (f"{o[d['batch']]:.2f}" if d["batch"] in o else "-" for o in others)
        print(f"{d['batch']:>6} {d['ms_per_step']:>9.2f} {d['tokens_per_s']:>10.0f} {e:>10} "
              f"{u:>8} {la:>13}")  # fmt: skip
    pf = data.get("prefill")
    if pf:
        print(f"prefill {prefill_arg}: {pf['tokens_per_s']:.0f} tok/s, "
              f"{pf['tflops']:.1f} TFLOP/s, MFU {pf['mfu']:.1%}")  # fmt: skip
    for key in (
        "attention",
        "attention_flex",
        "gpu_busy",
        "parity_fp32",
        "bf16_identical_share",
        "tax",
        "tax_no_instance_pool",
        "errors",
    ):
        if data.get(key):
            print(f"{key}: {data[key]}")
    print(f"summary: {data['summary']}  ({data['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
