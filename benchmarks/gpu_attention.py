"""One layer's decode attention on the 1B shape, three ways, for ``gpu.py``'s ``attention``
part: the Triton kernel reading pages in place (what the CUDA-graph path runs), gathering
the pages and SDPA (the eager path's way), and PyTorch's FlexAttention over the same pages.

FlexAttention is the alternative the kernel was chosen against: it is in torch itself (no
new dependency) and takes custom masks. Here it reads the page pool in place too: the page
table is its block mask's ``kv_indices`` (one block per page; the mask is built once per
shape, outside the timing, as an engine would keep it in buffers updated in place), and
the mask function checks each slot's liveness and position (Loom's semantics). The
key-count bound of a partly filled last page is left out (it would need a
physical-to-logical page map per sequence, as torch's ``PagedAttention`` keeps), so its
time is, if anything, a little low. Each way's output is checked against the gather's
(``*_max_err``), so a wrong kernel cannot post a fast time.

Run alone on a CPU (FlexAttention compiled for the CPU; the Triton kernel needs CUDA):
``python benchmarks/gpu_attention.py --device cpu --batches 1,4 --contexts 64``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from loom.engine.kv_cache import KVCache  # noqa: E402
from loom.engine.static_decode import DecodeInputs, reference_decode_attention  # noqa: E402
from loom.models.config import ModelConfig  # noqa: E402

PAGE = 16
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 64  # the 1B shape's attention
SCALE = HEAD_DIM**-0.5


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, fn: Callable[[], Any]) -> float:
    """Seconds of one call of ``fn``, the device synchronised around it."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def timed_us(device: str, fn: Callable[[], Any], calls: int = 50) -> float:
    """µs per call over ``calls`` back-to-back calls, after one call to warm up."""
    fn()
    return 1e6 * timed(device, lambda: [fn() for _ in range(calls)]) / calls


def short_error(e: Exception) -> str:
    """The exception's first line and, for a compiler's long output, its first error line."""
    lines = str(e).splitlines() or [""]
    errors = [ln.strip() for ln in lines[1:] if " error" in ln or "Error" in ln][:1]
    return " | ".join([f"{type(e).__name__}: {lines[0]}"[:200], *(x[:300] for x in errors)])


def flex_decode() -> Callable[[KVCache, DecodeInputs], Callable[[torch.Tensor], torch.Tensor]]:
    """Decode attention by FlexAttention over the page pool: ``prepare(cache, inputs)``
    builds the block mask once, as an engine would keep it in static buffers updated in
    place, and returns the call, q [B, H, D] -> [B, H, D]."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    # One compiled kernel per (batch, keys): more shapes than dynamo's default limit of 8
    # would fall back to the unfused implementation.
    config = torch._dynamo.config
    if hasattr(config, "recompile_limit"):  # (its name since torch 2.7)
        config.recompile_limit = max(config.recompile_limit, 64)
    compiled = torch.compile(flex_attention, dynamic=False)

    def prepare(cache: KVCache, inputs: DecodeInputs) -> Callable[[torch.Tensor], torch.Tensor]:
        batch, width = inputs.page_table.shape
        slots = cache.num_slots  # (a scratch slot past the pages is never read)
        # [slots, KVH, D] -> [1, KVH, slots, D]: every sequence reads the one pool
        k = cache.kv[0, 0, :slots].transpose(0, 1).unsqueeze(0)
        v = cache.kv[0, 1, :slots].transpose(0, 1).unsqueeze(0)
        live, pos, q_pos = cache.slot_live, cache.slot_pos, inputs.positions

        def visible(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
                    kv_idx: torch.Tensor) -> torch.Tensor:  # fmt: skip
            return live[kv_idx] & (pos[kv_idx] <= q_pos[b])

        pages = (inputs.kv_lens + PAGE - 1) // PAGE
        # The block mask spans the whole pool (its key axis must cover the keys' length);
        # each row lists its own pages first and reads only ``pages`` of them.
        table = torch.nn.functional.pad(inputs.page_table, (0, cache.num_pages - width))
        mask = BlockMask.from_kv_blocks(
            pages.to(torch.int32).view(batch, 1, 1),
            table.view(batch, 1, 1, cache.num_pages),
            BLOCK_SIZE=(128, PAGE),
            mask_mod=visible,
            seq_lengths=(1, slots),
            compute_q_blocks=False,  # (page ids are not block columns of one row)
        )

        def call(q: torch.Tensor) -> torch.Tensor:
            out = compiled(q[:, :, None, :], k, v, block_mask=mask, scale=SCALE, enable_gqa=True)
            return out.squeeze(2)  # type: ignore[union-attr]

        return call

    return prepare


def setup(device: str, dtype: torch.dtype, batch: int, ctx: int
          ) -> tuple[torch.Tensor, KVCache, DecodeInputs]:  # fmt: skip
    """A one-layer cache whose ``batch`` sequences hold ``ctx`` keys each on shuffled pages."""
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=128, hidden_size=2048,
                      intermediate_size=8, num_layers=1, num_heads=HEADS,
                      num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                      max_position_embeddings=4096)  # fmt: skip
    pages = batch * -(-ctx // PAGE)
    cache = KVCache(cfg, pages, PAGE, dtype, torch.device(device))
    cache.kv.normal_()
    table = torch.randperm(pages, device=device).view(batch, -1).to(torch.int32)
    # Each sequence's slots hold its positions 0, 1, ... in page-table order, as in a
    # prompt's prefill; the last page's slots past ``ctx`` stay unwritten.
    width = table.shape[1]
    logical = torch.arange(width * PAGE, device=device).expand(batch, -1)
    slots = (table.long()[:, :, None] * PAGE + torch.arange(PAGE, device=device)).view(batch, -1)
    written = logical < ctx
    cache.slot_pos[slots[written]] = logical[written]
    cache.slot_live[slots[written]] = True
    lens = torch.full((batch,), ctx, device=device)
    inputs = DecodeInputs(table[:, :1].long(), table, lens, lens - 1)
    q = torch.randn(batch, HEADS, HEAD_DIM, device=device, dtype=dtype)
    return q, cache, inputs


def attention(device: str, kernel: bool, batches: list[int], contexts: list[int],
              flex: bool = True) -> list[dict[str, float]]:  # fmt: skip
    """µs per call of each way at each batch and context (bf16 on CUDA, fp32 on a CPU),
    with each way's largest difference from the gather's output."""
    from loom.kernels import triton_decode

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    flex_prepare = flex_decode() if flex else None
    rows = []
    for ctx in contexts:
        for b in batches:
            q, cache, inputs = setup(device, dtype, b, ctx)
            sms = (torch.cuda.get_device_properties(device).multi_processor_count
                   if device.startswith("cuda") else 1)  # fmt: skip
            splits = triton_decode.splits_for(b, KV_HEADS, sms) if kernel else 1
            kv = cache.kv[0]
            ways: dict[str, Callable[[], torch.Tensor]] = {
                "gather_sdpa": lambda q=q, c=cache, i=inputs: reference_decode_attention(q, c, 0, i)
            }  # fmt: skip
            if kernel:
                ways["triton"] = lambda q=q, kv=kv, i=inputs, c=cache, s=splits: (
                    triton_decode.paged_decode_attention(
                        q, kv[0], kv[1], i.page_table, i.kv_lens, i.positions,
                        c.slot_pos, c.slot_live, PAGE, SCALE, s))  # fmt: skip
            row: dict[str, float] = {"batch": b, "context": ctx}
            if flex_prepare is not None:
                try:
                    flex_call = flex_prepare(cache, inputs)
                    ways["flex"] = lambda q=q, f=flex_call: f(q)
                except Exception as e:  # (as below: the other ways still run)
                    row["flex_error"] = short_error(e)  # type: ignore[assignment]
            expected = ways["gather_sdpa"]().float()
            for name, fn in ways.items():
                try:
                    if name != "gather_sdpa":
                        row[f"{name}_max_err"] = (fn().float() - expected).abs().max().item()
                    row[f"{name}_us"] = timed_us(device, fn)
                except Exception as e:  # one way failing keeps the others' figures
                    row[f"{name}_error"] = short_error(e)  # type: ignore[assignment]
            rows.append(row)
            print(f"  attention {row}", file=sys.stderr)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--contexts", default="256,2048")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/gpu_attention.json")
    args = ap.parse_args()
    from loom.kernels import triton_decode

    kernel = args.device.startswith("cuda") and triton_decode.available()
    rows = attention(args.device, kernel, [int(x) for x in args.batches.split(",")],
                     [int(x) for x in args.contexts.split(",")])  # fmt: skip
    print(f"{'batch':>6} {'keys':>6} {'gather+SDPA µs':>15} {'Triton µs':>10} {'Flex µs':>9}")
    for r in rows:
        cells = [
            f"{r[k]:.1f}" if k in r else "-" for k in ("gather_sdpa_us", "triton_us", "flex_us")
        ]
        print(f"{r['batch']:>6} {r['context']:>6} {cells[0]:>15} {cells[1]:>10} {cells[2]:>9}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
