"""Loom's engine against vLLM's CPU build (and `transformers`), side by side on the same weights.

Each system runs in its own process and loads the model once; the runs of one cell
(model, batch) alternate between the systems, each system idle before the other runs, and
every figure is a median (ratios: medians of the per-pair ratios). Greedy, EOS ignored,
128-token prompts and 128 new tokens by default:

  output tok/s = batch * new_tokens / time(generate)
  ms/step      = (time(max_tokens=new) - time(max_tokens=1)) / (new - 1)
  TTFT         = time(generate) of one 512-token prompt with max_tokens=1

``--contention`` repeats the cells with a busy process pinned to core 0. vLLM runs under
its own virtual environment (made once by ``bash benchmarks/setup_vllm.sh``):

    python benchmarks/engine_vs_vllm.py                           # small and medium
    python benchmarks/engine_vs_vllm.py --models small --batches 1 64 --runs 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SYSTEMS = ("loom", "vllm", "hf")
VLLM_ENV = {
    # Both cores for vLLM's OpenMP threads, none held back; it asks for tcmalloc and its
    # own libiomp to be preloaded (found by setup_vllm.sh).
    "VLLM_CPU_OMP_THREADS_BIND": "0-1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "VLLM_CPU_KVCACHE_SPACE": "2",
}


# ===== worker side: one system, one model, commands on stdin, answers on stdout =====


def _serve(system: str, model: str, max_batch: int) -> None:
    started = time.perf_counter()
    generate = _load(system, model, max_batch)
    _answer({"ready": True, "load_s": time.perf_counter() - started})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            return
        import torch

        g = torch.Generator().manual_seed(cmd["seed"])
        prompts = torch.randint(10, 32000, (cmd["batch"], cmd["prompt_len"]), generator=g)
        t = time.perf_counter()
        tokens = generate(prompts.tolist(), cmd["new"])
        _answer({"seconds": time.perf_counter() - t, "first": tokens[0][:8]})


def _answer(msg: dict[str, Any]) -> None:
    print("@@" + json.dumps(msg), flush=True)


def _load(system: str, model: str, max_batch: int) -> Any:
    """Load ``model`` into ``system``; return generate(prompts, new) -> token ids."""
    if system == "loom":
        from loom import LLM, SamplingParams

        # Each engine with its own step budget (chunked prefill) and batch defaults.
        llm = LLM(model, dtype="bfloat16", enable_prefix_caching=False, kv_cache_memory_mb=2048)

        def loom_generate(prompts: list[list[int]], new: int) -> list[list[int]]:
            p = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
            return [o.token_ids for o in llm.generate(prompts, p)]

        return loom_generate
    if system == "vllm":
        from vllm import LLM as VLLM
        from vllm import SamplingParams as VParams

        # No prefix caching in either engine: every run is a full prefill.
        vllm = VLLM(
            model=model,
            dtype="bfloat16",
            max_model_len=1024,
            enable_prefix_caching=False,
        )

        def vllm_generate(prompts: list[list[int]], new: int) -> list[list[int]]:
            p = VParams(max_tokens=new, temperature=0.0, ignore_eos=True)
            inputs = [{"prompt_token_ids": ids} for ids in prompts]
            outs = vllm.generate(inputs, p, use_tqdm=False)  # type: ignore[arg-type]
            return [list(o.outputs[0].token_ids) for o in outs]

        return vllm_generate
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).eval()

    def hf_generate(prompts: list[list[int]], new: int) -> list[list[int]]:
        ids = torch.tensor(prompts)
        with torch.inference_mode():
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
        return [row[ids.shape[1] :] for row in out.tolist()]

    return hf_generate


# ===== driver side =====


class Worker:
    """One system's process; ``run`` times one generate call in it."""

    def __init__(self, system: str, model: Path, max_batch: int, vllm_python: Path) -> None:
        env = dict(os.environ)
        python = sys.executable
        if system == "vllm":
            python = str(vllm_python)
            env.update(VLLM_ENV)
            env["LD_PRELOAD"] = _vllm_preload(vllm_python)
        self.system = system
        cmd = [
            python,
            str(Path(__file__).resolve()),
            "--serve",
            system,
            "--model",
            str(model),
            "--max-batch",
            str(max_batch),
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self.load_s = self._read()["load_s"]

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("@@"):
                msg: dict[str, Any] = json.loads(line[2:])
                return msg
        raise RuntimeError(f"{self.system} worker exited (code {self.proc.wait()})")

    def run(self, batch: int, prompt_len: int, new: int, seed: int) -> float:
        assert self.proc.stdin is not None
        cmd = {"op": "gen", "batch": batch, "prompt_len": prompt_len, "new": new, "seed": seed}
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        seconds: float = self._read()["seconds"]
        return seconds

    def peak_rss_mb(self) -> float:
        """Sum of the peak RSS (VmHWM) of the worker and its child processes."""
        total = 0
        for pid in _tree(self.proc.pid):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        return total / 1024

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        todo.extend(int(c) for c in children)
    return pids


def _vllm_preload(vllm_python: Path) -> str:
    venv_lib = vllm_python.resolve().parent.parent / "lib"
    found = [
        str(p)
        for p in (Path("/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"), venv_lib / "libiomp5.so")
        if p.exists()
    ]
    return ":".join(found)


def _busy_core0() -> subprocess.Popen[bytes]:
    """A process that keeps core 0 busy (what a tokenizer or a neighbour service does)."""
    return subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c", "while True: pass"])


def bench_cell(workers: dict[str, Worker], batch: int, args: argparse.Namespace) -> dict[str, Any]:
    """Alternated runs of every system on one batch size; medians and per-pair ratios."""
    runs: dict[str, list[tuple[float, float]]] = {s: [] for s in workers}
    for rep in range(args.runs):
        for system, w in workers.items():
            # Fresh prompts each run (the same ones for every system).
            one = w.run(batch, args.prompt_len, 1, seed=1000 * rep + batch)
            full = w.run(batch, args.prompt_len, args.new_tokens, seed=1000 * rep + batch + 1)
            runs[system].append((one, full))
            # vLLM keeps a core busy for about a second after a batch: let it go idle.
            time.sleep(args.idle_s)
    cell: dict[str, Any] = {"batch": batch}
    for system, pairs in runs.items():
        tps = [batch * args.new_tokens / full for _, full in pairs]
        steps = [(full - one) / (args.new_tokens - 1) * 1e3 for one, full in pairs]
        cell[system] = {
            "tok_s": statistics.median(tps),
            "ms_per_step": statistics.median(steps),
            "tok_s_runs": tps,
        }
    if "vllm" in runs:
        ratios = [
            a / b
            for a, b in zip(cell["loom"]["tok_s_runs"], cell["vllm"]["tok_s_runs"], strict=True)
        ]
        cell["ratio_loom_over_vllm"] = statistics.median(ratios)
    return cell


def bench_ttft(workers: dict[str, Worker], args: argparse.Namespace) -> dict[str, Any]:
    samples: dict[str, list[float]] = {s: [] for s in workers}
    for w in workers.values():
        w.run(1, args.ttft_prompt, 1, seed=7)  # warm-up at this length
    for rep in range(args.runs):
        for system, w in workers.items():
            samples[system].append(w.run(1, args.ttft_prompt, 1, seed=100 + rep))
            time.sleep(args.idle_s)
    out: dict[str, Any] = {s: statistics.median(v) * 1e3 for s, v in samples.items()}
    if "vllm" in samples:
        out["ratio_vllm_over_loom"] = statistics.median(
            [v / lo for lo, v in zip(samples["loom"], samples["vllm"], strict=True)]
        )
    return out


def bench_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from engine_throughput import model_dir

    path = model_dir(name, args.cache)
    workers: dict[str, Worker] = {}
    try:
        for system in args.systems:
            print(f"[{name}] loading {system} ...", flush=True)
            workers[system] = Worker(system, path, max(args.batches), args.vllm_python)
            print(f"[{name}] {system} loaded in {workers[system].load_s:.1f} s", flush=True)
        for w in workers.values():
            w.run(2, args.prompt_len, 4, seed=0)  # warm-up
        result: dict[str, Any] = {"model": name, "cells": [], "contended": []}
        result["load_s"] = {s: w.load_s for s, w in workers.items()}
        for batch in args.batches:
            result["cells"].append(cell := bench_cell(workers, batch, args))
            _print_cell(name, cell, "")
        result["ttft_ms"] = bench_ttft(workers, args)
        print(f"[{name}] TTFT {args.ttft_prompt} tokens: {result['ttft_ms']}", flush=True)
        if args.contention and name in args.contention:
            busy = _busy_core0()
            try:
                time.sleep(1.0)
                contended = {s: w for s, w in workers.items() if s != "hf"}
                for batch in args.batches:
                    result["contended"].append(cell := bench_cell(contended, batch, args))
                    _print_cell(name, cell, " (core 0 busy)")
            finally:
                busy.kill()
        result["peak_rss_mb"] = {s: w.peak_rss_mb() for s, w in workers.items()}
        return result
    finally:
        for w in workers.values():
            w.close()


def _print_cell(name: str, cell: dict[str, Any], note: str) -> None:
    parts = [f"{s} {cell[s]['tok_s']:.0f} tok/s" for s in SYSTEMS if s in cell]
    ratio = cell.get("ratio_loom_over_vllm")
    tail = f"  loom/vllm {ratio:.2f}x" if ratio is not None else ""
    print(f"[{name}] b={cell['batch']}{note}: " + ", ".join(parts) + tail, flush=True)


def summarize(models: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for m in models:
        name = m["model"]
        ratios = [c["ratio_loom_over_vllm"] for c in m["cells"] if "ratio_loom_over_vllm" in c]
        if ratios:
            summary[f"min_ratio_loom_over_vllm_{name}"] = min(ratios)
        busy = [c["ratio_loom_over_vllm"] for c in m["contended"] if "ratio_loom_over_vllm" in c]
        if busy:
            summary[f"min_ratio_loom_over_vllm_{name}_core0_busy"] = min(busy)
        if "ratio_vllm_over_loom" in m["ttft_ms"]:
            summary[f"ttft_ratio_vllm_over_loom_{name}"] = m["ttft_ms"]["ratio_vllm_over_loom"]
    return summary


def _fmt(cell: dict[str, Any], system: str, key: str) -> str:
    if system not in cell:
        return "-"
    return f"{cell[system][key]:.{1 if key == 'ms_per_step' else 0}f}"


def print_table(models: list[dict[str, Any]]) -> None:
    cols = [
        ("model", 7),
        ("load", 6),
        ("batch", 6),
        ("Loom tok/s", 11),
        ("vLLM tok/s", 11),
        ("HF tok/s", 9),
        ("Loom/vLLM", 10),
        ("Loom ms/step", 13),
        ("vLLM ms/step", 13),
    ]
    header = "".join(
        f"{name:<{w}}" if i == 0 else f"{name:>{w}}" for i, (name, w) in enumerate(cols)
    )
    print("\n" + header + "\n" + "-" * len(header))
    for m in models:
        for label, cells in (("", m["cells"]), ("busy", m["contended"])):
            for c in cells:
                ratio = f"{c['ratio_loom_over_vllm']:.2f}x" if "ratio_loom_over_vllm" in c else "-"
                values = [
                    m["model"],
                    label,
                    str(c["batch"]),
                    _fmt(c, "loom", "tok_s"),
                    _fmt(c, "vllm", "tok_s"),
                    _fmt(c, "hf", "tok_s"),
                    ratio,
                    _fmt(c, "loom", "ms_per_step"),
                    _fmt(c, "vllm", "ms_per_step"),
                ]
                print(
                    "".join(
                        f"{v:<{w}}" if i == 0 else f"{v:>{w}}"
                        for i, (v, (_, w)) in enumerate(zip(values, cols, strict=True))
                    )
                )
        t, load, rss = m["ttft_ms"], m["load_s"], m["peak_rss_mb"]
        print(
            f"  {m['model']}: TTFT "
            + ", ".join(f"{s} {t[s]:.0f} ms" for s in load)
            + "; load "
            + ", ".join(f"{s} {load[s]:.1f} s" for s in load)
            + "; peak RSS "
            + ", ".join(f"{s} {rss[s]:.0f} MB" for s in rss)
        )


def plot(models: list[dict[str, Any]], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e '.[bench]')")
        return
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, m in zip(axes[0], models, strict=True):
        for label, cells, style in (("", m["cells"], "-o"), (" core 0 busy", m["contended"], ":x")):
            for system in SYSTEMS:
                pts = [(c["batch"], c[system]["tok_s"]) for c in cells if system in c]
                if pts:
                    ax.plot([b for b, _ in pts], [t for _, t in pts], style, label=system + label)
        ax.set(title=m["model"], xlabel="batch", ylabel="output tokens/s", xscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--serve", choices=SYSTEMS, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--max-batch", type=int, default=64, help=argparse.SUPPRESS)
    ap.add_argument("--models", nargs="+", default=["small", "medium"])
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32, 64])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--ttft-prompt", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3, help="alternated runs per cell")
    ap.add_argument("--idle-s", type=float, default=1.5, help="pause after each run")
    ap.add_argument(
        "--contention",
        nargs="*",
        default=["small", "medium"],
        help="models also measured with a busy process on core 0",
    )
    default_vllm = os.environ.get("LOOM_VLLM_PYTHON", ".venv-vllm/bin/python")
    ap.add_argument("--vllm-python", type=Path, default=Path(default_vllm))
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "loom")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "engine_vs_vllm.json")
    args = ap.parse_args()
    if args.serve:
        _serve(args.serve, args.model, args.max_batch)
        return
    if "vllm" in args.systems and not args.vllm_python.exists():
        sys.exit(f"no vLLM at {args.vllm_python}: run `bash benchmarks/setup_vllm.sh` first")
    sys.path.insert(0, str(HERE))
    models = [bench_model(name, args) for name in args.models]
    print_table(models)
    summary = summarize(models)
    print("summary:", json.dumps(summary, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("serve", "model", "max_batch")}
    args.out.write_text(
        json.dumps(
            {"summary": summary, "settings": settings, "models": models}, indent=2, default=str
        )
    )
    print(f"wrote {args.out}")
    plot(models, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
