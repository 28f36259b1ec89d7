"""Per-op latency of the engine worker: one-token decode batches run through a direct
``Engine.execute``, the thread worker and the process worker, side by side.

Each system has its own engine (same model) and its own sequences: one prefill of
``--prompt-len`` tokens per sequence, then one-token decode steps (every sequence one token
longer per step, as real decoding). One op's latency is submit -> result drained (for the
direct engine: the ``execute`` call). Runs are interleaved (direct, thread, process, in a
rotating order) so all three see the same machine state; each run's median latency per
system is kept, and the ratio vs direct is the median of per-run ratios.

    python benchmarks/engine_worker_ipc.py                       # tiny model, batches 1 32
    python benchmarks/engine_worker_ipc.py --batches 1 8 32 --runs 9 --ops 100
"""

from __future__ import annotations

import argparse
import json
import pickle
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch

from loom.config import EngineConfig
from loom.engine.batch import ForwardBatch, OutputResult, OutputSpec, SamplerSpec
from loom.engine.engine import Engine
from loom.engine.page_pool import PagePool
from loom.engine.worker import EngineWorker, ExecuteOp, ResetPagesOp, start_worker
from loom.engine.worker.wire import _dumps as wire_dumps  # what the process worker sends

SYSTEMS = ("direct", "thread", "process")


class Direct:
    """``Engine.execute`` on this thread: the baseline."""

    def __init__(self, config: EngineConfig) -> None:
        self.engine = Engine(config)
        self.num_pages, self.page_size = self.engine.pool.num_pages, self.engine.pool.page_size

    def execute(self, batch: ForwardBatch, fresh: list[int]) -> list[OutputResult]:
        self.engine.runner.cache.reset_pages(fresh)
        return self.engine.execute(batch)

    def close(self) -> None:
        pass


class Worker:
    """One op at a time through an ``EngineWorker``: submit, wait for on_ready, drain."""

    def __init__(self, config: EngineConfig, mode: Any) -> None:
        self.ready = threading.Event()
        self.worker: EngineWorker = start_worker(config, mode=mode, on_ready=self.ready.set)
        self.num_pages, self.page_size = self.worker.info.num_pages, self.worker.info.page_size

    def execute(self, batch: ForwardBatch, fresh: list[int]) -> list[OutputResult]:
        result = self.run(ExecuteOp(batch, fresh))
        assert isinstance(result, list)
        return result

    def run(self, op: Any) -> object:
        op_id = self.worker.submit(op)
        while True:
            self.ready.wait()
            self.ready.clear()
            for done_id, result in self.worker.drain():
                if done_id == op_id:
                    if isinstance(result, BaseException):
                        raise result
                    return result

    def empty_op_us(self, n: int) -> float:
        """Median round trip of an op that does nothing: the worker's own latency."""
        samples = []
        for _ in range(n):
            t = time.perf_counter()
            self.run(ResetPagesOp([]))
            samples.append(time.perf_counter() - t)
        return statistics.median(samples) * 1e6

    def close(self) -> None:
        self.worker.close()


class Decoder:
    """``batch`` sequences on one system, advanced one token per ``step``."""

    def __init__(self, system: Direct | Worker, batch: int, prompt_len: int, vocab: int) -> None:
        self.system = system
        self.pool = PagePool(system.num_pages, system.page_size)
        g = torch.Generator().manual_seed(batch)
        prompts = torch.randint(10, vocab, (batch, prompt_len), generator=g).tolist()
        self.pages = [self.pool.allocate(self.pool.pages_for(prompt_len)) for _ in prompts]
        self.lens = [prompt_len] * batch
        prefill = ForwardBatch(
            token_ids=[t for p in prompts for t in p],
            positions=[i for _ in prompts for i in range(prompt_len)],
            seq_indptr=[i * prompt_len for i in range(batch + 1)],
            page_tables=self.pages,
            last_page_lens=[self._last_len(n) for n in self.lens],
            outputs=[OutputSpec((i + 1) * prompt_len - 1, SamplerSpec()) for i in range(batch)],
        )
        results = system.execute(prefill, self.pool.drain_fresh())
        self.tokens = [r.token or 0 for r in results]

    def _last_len(self, n: int) -> int:
        return n - (self.pool.pages_for(n) - 1) * self.pool.page_size

    def next_batch(self) -> tuple[ForwardBatch, list[int]]:
        """The next one-token decode batch and the pages it allocated."""
        for s, n in enumerate(self.lens):
            if self.pool.pages_for(n + 1) > len(self.pages[s]):
                self.pages[s] += self.pool.allocate(1)
        batch = ForwardBatch(
            token_ids=list(self.tokens),
            positions=list(self.lens),
            seq_indptr=list(range(len(self.lens) + 1)),
            page_tables=[list(p) for p in self.pages],
            last_page_lens=[self._last_len(n + 1) for n in self.lens],
            outputs=[OutputSpec(i, SamplerSpec()) for i in range(len(self.lens))],
        )
        return batch, self.pool.drain_fresh()

    def step(self) -> float:
        """Run one decode step; return its latency in seconds."""
        batch, fresh = self.next_batch()
        t = time.perf_counter()
        results = self.system.execute(batch, fresh)
        dt = time.perf_counter() - t
        self.tokens = [r.token or 0 for r in results]
        self.lens = [n + 1 for n in self.lens]
        return dt

    def free(self) -> None:
        for p in self.pages:
            self.pool.free(p)


def bench_cell(
    systems: dict[str, Direct | Worker],
    batch: int,
    prompt_len: int,
    ops: int,
    runs: int,
    warmup: int,
    vocab: int,
) -> dict[str, Any]:
    decoders = {name: Decoder(s, batch, prompt_len, vocab) for name, s in systems.items()}
    for dec in decoders.values():
        for _ in range(warmup):
            dec.step()
    medians: dict[str, list[float]] = {name: [] for name in systems}
    for run in range(runs):
        # Rotate the order so no system always runs right after another.
        order = SYSTEMS[run % 3 :] + SYSTEMS[: run % 3]
        for name in order:
            medians[name].append(statistics.median(decoders[name].step() for _ in range(ops)))
    for dec in decoders.values():
        dec.free()
    direct = medians["direct"]
    cell: dict[str, Any] = {"batch": batch}
    for name in SYSTEMS:
        cell[f"{name}_us"] = statistics.median(medians[name]) * 1e6
        cell[f"{name}_runs_us"] = [m * 1e6 for m in medians[name]]
        pairs = list(zip(medians[name], direct, strict=True))
        cell[f"{name}_ratio"] = statistics.median(m / d for m, d in pairs)
        cell[f"{name}_overhead_us"] = statistics.median((m - d) * 1e6 for m, d in pairs)
    return cell


def op_costs(engine: Engine, batch: int) -> dict[str, float]:
    """Microseconds of the pieces the workers add to a one-token decode op."""
    ps, vocab = engine.pool.page_size, engine.model_config.vocab_size
    b = ForwardBatch(
        token_ids=[5] * batch,
        positions=[40] * batch,
        seq_indptr=list(range(batch + 1)),
        page_tables=[[3 * s, 3 * s + 1, 3 * s + 2] for s in range(batch)],
        last_page_lens=[41 - 2 * ps] * batch,
        outputs=[OutputSpec(i, SamplerSpec()) for i in range(batch)],
    )
    op = ExecuteOp(b, [])
    results = [OutputResult(token=7) for _ in range(batch)]
    n = 2000

    def per_call(fn: Any) -> float:
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t) / n * 1e6

    return {
        "op_pickle_bytes": float(len(wire_dumps(op))),
        "op_pickle_roundtrip_us": per_call(lambda: pickle.loads(wire_dumps(op))),
        "results_pickle_roundtrip_us": per_call(lambda: pickle.loads(wire_dumps(results))),
        "validate_us": per_call(lambda: b.validate(engine.pool.num_pages, ps, vocab)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="a model directory, or 'tiny'")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--ops", type=int, default=100, help="decode ops per system per run")
    ap.add_argument("--runs", type=int, default=9, help="interleaved runs; medians reported")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/engine_worker_ipc.json"))
    args = ap.parse_args()

    # Room for every sequence of the largest batch to reach its final length.
    max_len = args.prompt_len + args.warmup + args.runs * args.ops + 1
    page_size = EngineConfig().page_size
    num_pages = sum(b * -(-max_len // page_size) for b in args.batches)
    config = EngineConfig(model=args.model, dtype=args.dtype, num_pages=num_pages)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; starting engines ...")
    direct = Direct(config)
    systems: dict[str, Direct | Worker] = {
        "direct": direct,
        "thread": Worker(config, "thread"),
        "process": Worker(config, "process"),
    }
    vocab = direct.engine.model_config.vocab_size
    rows = []
    empty: dict[str, list[float]] = {"thread": [], "process": []}
    try:
        for _ in range(args.runs):  # interleaved too
            for name in empty:
                worker = systems[name]
                assert isinstance(worker, Worker)
                empty[name].append(worker.empty_op_us(args.ops))
        for batch in args.batches:
            cell = bench_cell(
                systems, batch, args.prompt_len, args.ops, args.runs, args.warmup, vocab
            )
            cell.update(op_costs(direct.engine, batch))
            rows.append(cell)
            print(
                f"  b={batch}: direct {cell['direct_us']:.0f} us, thread "
                f"{cell['thread_us']:.0f} us, process {cell['process_us']:.0f} us",
                flush=True,
            )
    finally:
        for s in systems.values():
            s.close()

    header = (
        f"{'batch':>5}{'direct us':>11}{'thread us':>11}{'ratio':>7}{'+us':>7}"
        f"{'process us':>12}{'ratio':>7}{'+us':>7}{'op bytes':>10}{'pickle us':>11}"
        f"{'validate us':>13}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(
            f"{r['batch']:>5}{r['direct_us']:>11.0f}"
            f"{r['thread_us']:>11.0f}{r['thread_ratio']:>6.2f}x{r['thread_overhead_us']:>7.0f}"
            f"{r['process_us']:>12.0f}{r['process_ratio']:>6.2f}x{r['process_overhead_us']:>7.0f}"
            f"{r['op_pickle_bytes']:>10.0f}"
            f"{r['op_pickle_roundtrip_us'] + r['results_pickle_roundtrip_us']:>11.1f}"
            f"{r['validate_us']:>13.1f}"
        )
    empty_us = {name: statistics.median(v) for name, v in empty.items()}
    print(
        f"empty op (ResetPagesOp([])) round trip: thread {empty_us['thread']:.0f} us, "
        f"process {empty_us['process']:.0f} us"
    )
    print(
        f"(per-op latency of a one-token decode batch: medians over {args.runs} interleaved "
        f"runs of {args.ops} ops each; ratio and +us: medians of per-run ratios/differences "
        "vs direct; pickle us: op + results pickle round trips; validate us: one "
        "ForwardBatch.validate, which the worker runs on top of Engine.execute's own)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "model": args.model,
                "dtype": args.dtype,
                "prompt_len": args.prompt_len,
                "ops": args.ops,
                "runs": args.runs,
                "empty_op_us": empty_us,
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
