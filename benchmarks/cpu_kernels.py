"""Loom's CPU kernels against torch's ops on the same tensors.

Paged attention (``loom.kernels.cpu.paged_attention``) against SDPA for causal prefill and
for decode over pages (SDPA after gathering the pages, and over a dense copy as the decode
mirror keeps one), and RMSNorm against torch's ``rms_norm``. Each cell: the median of
``--repeats`` timed calls, kernel and torch alternated; the error column is the largest
absolute difference from a float64 reference. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from loom.kernels import cpu as cpu_kernels

HERE = Path(__file__).resolve().parent
DIM = 64
PAGE = 16


def timed(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median ms of each function, calls alternated."""
    for f in fns:
        f()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, f in enumerate(fns):
            t = time.perf_counter()
            f()
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) * 1e3 for t in times]


def prefill_cell(heads: int, kv_heads: int, lens: list[int], repeats: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    tokens, seqs, width = sum(lens), len(lens), max(lens)
    assert all(n == width for n in lens), "equal lengths keep the SDPA side one call"
    q = torch.randn(tokens, heads, DIM, generator=g).bfloat16()
    k = torch.randn(tokens, kv_heads, DIM, generator=g).bfloat16()
    v = torch.randn(tokens, kv_heads, DIM, generator=g).bfloat16()
    rows = torch.arange(tokens).view(seqs, width)
    pos = torch.arange(width).repeat(seqs, 1)
    kv_lens, indptr = torch.tensor(lens), torch.arange(seqs + 1) * width
    q_pos = torch.arange(tokens) % width

    def kernel() -> torch.Tensor:
        return cpu_kernels.paged_attention(q, k, v, rows, pos, kv_lens, indptr, q_pos, DIM**-0.5)

    qs, ks, vs = (t.view(seqs, width, -1, DIM).transpose(1, 2) for t in (q, k, v))

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)

    ref = F.scaled_dot_product_attention(
        qs.double(), ks.double(), vs.double(), is_causal=True, enable_gqa=True
    )
    ref_rows = ref.transpose(1, 2).reshape(tokens, heads, DIM)
    t_kernel, t_sdpa = timed([kernel, sdpa], repeats)
    flops = sum(n * n for n in lens) * heads * DIM * 2  # the causal half of 4 * L^2 * D
    return {
        "case": f"prefill {seqs}x{width}",
        "heads": f"{heads}/{kv_heads}",
        "kernel_ms": t_kernel,
        "torch_ms": t_sdpa,
        "kernel_gflops": flops / t_kernel / 1e6,
        "kernel_err": (kernel().double() - ref_rows).abs().max().item(),
        "torch_err": (sdpa().transpose(1, 2).reshape(tokens, heads, DIM) - ref_rows)
        .abs()
        .max()
        .item(),
    }


def decode_cell(heads: int, kv_heads: int, seqs: int, keys: int, repeats: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    pages_per_seq = -(-keys // PAGE)
    num_pages = 4 * seqs * pages_per_seq  # a pool larger than the batch, pages scattered
    k_cache = torch.randn(num_pages * PAGE, kv_heads, DIM, generator=g).bfloat16()
    v_cache = torch.randn(num_pages * PAGE, kv_heads, DIM, generator=g).bfloat16()
    pages = torch.randperm(num_pages, generator=g)[: seqs * pages_per_seq].view(seqs, -1)
    rows = (pages[:, :, None] * PAGE + torch.arange(PAGE)).view(seqs, -1)[:, :keys].contiguous()
    q = torch.randn(seqs, heads, DIM, generator=g).bfloat16()
    pos = torch.arange(keys).repeat(seqs, 1)
    kv_lens, indptr = torch.full((seqs,), keys), torch.arange(seqs + 1)
    q_pos = torch.full((seqs,), keys - 1)

    def kernel() -> torch.Tensor:
        return cpu_kernels.paged_attention(
            q, k_cache, v_cache, rows, pos, kv_lens, indptr, q_pos, DIM**-0.5
        )

    # SDPA's side as the engine runs it: query heads folded per KV head, keys [S, KVH, L, D].
    folded = q.view(seqs, kv_heads, heads // kv_heads, DIM)
    flat = rows.view(-1)

    def gathered() -> torch.Tensor:
        keys_ = k_cache.index_select(0, flat).view(seqs, keys, kv_heads, DIM).transpose(1, 2)
        vals_ = v_cache.index_select(0, flat).view(seqs, keys, kv_heads, DIM).transpose(1, 2)
        return F.scaled_dot_product_attention(folded, keys_, vals_)

    dense_k = k_cache[flat].view(seqs, keys, kv_heads, DIM).transpose(1, 2).contiguous()
    dense_v = v_cache[flat].view(seqs, keys, kv_heads, DIM).transpose(1, 2).contiguous()

    def mirror() -> torch.Tensor:
        return F.scaled_dot_product_attention(folded, dense_k, dense_v)

    ref = F.scaled_dot_product_attention(folded.double(), dense_k.double(), dense_v.double()).view(
        seqs, heads, DIM
    )
    t_kernel, t_gather, t_mirror = timed([kernel, gathered, mirror], repeats)
    return {
        "case": f"decode {seqs}x{keys}",
        "heads": f"{heads}/{kv_heads}",
        "kernel_ms": t_kernel,
        "torch_ms": t_gather,
        "torch_mirror_ms": t_mirror,
        "kv_mb": 2 * seqs * keys * kv_heads * DIM * 2 / 1e6,
        "kernel_err": (kernel().double() - ref).abs().max().item(),
        "torch_err": (mirror().double().view(seqs, heads, DIM) - ref).abs().max().item(),
    }


def rms_cell(rows: int, hidden: int, repeats: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(rows, hidden, generator=g).bfloat16()
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).bfloat16()
    ref = w * F.rms_norm(x.double(), (hidden,), eps=1e-6).bfloat16()

    def kernel() -> torch.Tensor:
        return cpu_kernels.rms_norm(x, w, 1e-6)

    def torch_op() -> torch.Tensor:
        return w * F.rms_norm(x, (hidden,), eps=1e-6)

    t_kernel, t_torch = timed([kernel, torch_op], repeats)
    return {
        "case": f"rms_norm {rows}x{hidden}",
        "heads": "",
        "kernel_ms": t_kernel,
        "torch_ms": t_torch,
        "kernel_err": (kernel().double() - ref.double()).abs().max().item(),
        "torch_err": (torch_op().double() - ref.double()).abs().max().item(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "cpu_kernels.json")
    args = ap.parse_args()
    if not cpu_kernels.available():
        raise SystemExit("Loom's CPU kernels could not be built here (is g++ installed?)")
    torch.set_grad_enabled(False)
    r = args.repeats
    cells = []
    for heads, kv_heads in ((8, 4), (16, 8)):  # the small and medium shapes
        cells += [prefill_cell(heads, kv_heads, lens, r) for lens in ([512], [128] * 32)]
        cells += [decode_cell(heads, kv_heads, s, 200, r) for s in (1, 32, 64)]
    cells += [rms_cell(n, h, r) for n, h in ((1, 512), (1, 1024), (512, 1024))]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16, head dim {DIM}")
    head = f"{'case':<22}{'heads':>6}{'kernel ms':>11}{'torch ms':>10}{'speedup':>9}"
    print(head + f"{'kernel err':>12}{'torch err':>11}")
    print("-" * (len(head) + 23))
    for c in cells:
        speedup = c["torch_ms"] / c["kernel_ms"]
        print(
            f"{c['case']:<22}{c['heads']:>6}{c['kernel_ms']:>11.3f}{c['torch_ms']:>10.3f}"
            f"{speedup:>8.2f}x{c['kernel_err']:>12.2e}{c['torch_err']:>11.2e}"
        )
    print(
        "(torch: SDPA for prefill, SDPA after gathering the pages for decode (over the decode "
        "mirror's dense copy: torch_mirror_ms in the JSON), F.rms_norm; err: max |x - float64|)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": torch.get_num_threads(), "cells": cells}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
