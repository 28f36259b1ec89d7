"""Soak: mixed load on one ``loom serve`` for ``--duration-s`` (600 s by default), with
hostile inferlets and bad input beside it and one engine-worker kill, then counting the
errors of well-behaved clients and what was leaked.

A real ``loom serve`` (the embedded tiny model, engine worker in its own process, an API
key, ``--http-allow-hosts 127.0.0.1``, ``--max-instances``, ``--max-tree-instances``,
``--max-tree-page-share 0.5``, ``--idle-timeout-s``) on 127.0.0.1. The run:

1. warm-up: the well-behaved clients for ``--warmup-s``, then every hostile actor once for
   ``--warmup-slot-s`` (programs loaded, the server's memory at the working set each
   attack needs: the RSS baseline is warm), then settle as in 4;
2. idle (``--idle-fraction`` of the duration): well-behaved clients only, for the
   baseline latencies: ``--concurrency`` closed-loop clients, ``--think-ms`` between
   requests, each taking its turn at a streamed chat completion (TTFT measured), a
   non-streamed completion and an inferlet (``inferlets/text_completion``) launched over
   the WebSocket protocol; ``--max-tokens`` tokens each, end-of-sequence ignored;
3. attack (the rest): the same clients go on while a second process (nice 19) runs the
   hostile inferlets of ``benchmarks/soak_inferlets/hostile`` in turn, ``--slot-s`` each
   (page hoarder, fork bomb, child-launch flood, export hoarder, memory hog, CPU
   spinners, message floods to a reading and to a vanishing client, pull-then-die, idle
   instances whose client vanished, an HTTP redirect off the allow-list), and bad input
   to the OpenAI API and the WebSocket protocol the whole time
   (``soak_parts/bad_inputs.py``); half-way through, the engine worker is killed
   (``kill -9``) once;
4. settle: the hostile actors stop; the soak waits until the server holds no instance,
   completion, queued command or KV page beyond the prefix cache (at most
   ``--settle-timeout-s``: detached idle children end by the idle timeout, a busy
   instance whose client left by its CPU budget), reads the leak checks, then sends
   every kind of well-behaved request three more times.

An error of a well-behaved client: a request of the well-behaved clients (idle, attack
or the check after) that did not end in a 200 with the whole answer (a non-200 status,
a stream without ``[DONE]`` and ``finish_reason`` length, an error chunk, fewer tokens,
an inferlet that did not return, no answer within ``--request-timeout-s``, a broken
connection), unless it was in flight during the fault window: from the kill until
``/health`` reports the new worker (those are "failed by the injected fault").

Leaks (each a check; ``leaks`` counts the failed ones): KV pages held beyond the prefix
cache back to the pre-run figure; no instance, completion or queued command left; RSS of
the server and of the engine worker at most ``--rss-tolerance`` (fraction) or
``--rss-floor-mb`` above the warm baseline read at the end of the idle phase, whichever
is larger; the server's file descriptors and threads at most 8 above it. The RSS bound:
10 % is what ``tests/reliability/test_memory.py`` holds 1,000 finished inferlets to; the
96 MB floor covers what the server keeps by design (the records and event backlogs of
the last 1,000 finished instances, for late attachers: up to 4 x ``--event-backlog-mb``,
64 MiB of events) and the allocator's slack after transient peaks (128 instances at
once, ~0.7 GB; floods of 100,000+ messages: in a separate server, a 4 s flood left
+40 MB once, then flat over four more). The baseline is warm (the warm-up ran every
actor once); ``server_rss_mb_at_each_round`` in the JSON tells a step that stays put
(memory kept) from growth round over round (a leak).

The server's flags are the defaults but for those named above; ``--serve-arg`` adds more
(e.g. ``--serve-arg=--slice-ms=5``). Bad input comes from 127.0.0.2 and 127.0.0.3, not
127.0.0.1: the server refuses an address after 20 failed key checks a minute, which
must not lock the well-behaved clients out.

    python benchmarks/soak.py [--duration-s 600] [--concurrency 3] [--no-kill] \\
        [--actors page-hoarder,fork-bomb,...] [--out benchmarks/results/soak.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from soak_parts import report  # noqa: E402
from soak_parts.clients import WellBehaved  # noqa: E402
from soak_parts.hostile import ACTORS  # noqa: E402
from soak_parts.server import Server, snapshot  # noqa: E402

API_KEY = "soak-key"
SETTLED = ("instances", "instances_running", "completions_running", "commands_queued")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration-s", type=float, default=600, help="idle + attack phases")
    ap.add_argument("--idle-fraction", type=float, default=0.25)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--concurrency", type=int, default=3, help="well-behaved clients")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--think-ms", type=float, default=100)
    ap.add_argument("--warmup-s", type=float, default=5)
    ap.add_argument(
        "--warmup-slot-s",
        type=float,
        default=0,
        help="each actor's warm-up turn (0: min(slot, 6 s))",
    )
    ap.add_argument("--request-timeout-s", type=float, default=120)
    ap.add_argument("--actors", default=",".join(ACTORS), help="hostile actors, in turn")
    ap.add_argument(
        "--slot-s",
        type=float,
        default=0,
        help="each actor's turn (0: the attack over two rounds, 4-12 s)",
    )
    ap.add_argument("--bad-input-interval-s", type=float, default=0.3)
    ap.add_argument("--no-kill", action="store_true", help="no engine-worker kill")
    ap.add_argument("--max-instances", type=int, default=128)
    ap.add_argument("--idle-timeout-s", type=float, default=20)
    ap.add_argument(
        "--max-tree-instances",
        type=int,
        default=32,
        help="a quarter of --max-instances: a fork bomb's tree, a launch flood's detached "
        "children left to the idle timeout and the next actor's fit beside the clients",
    )
    ap.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        help="more flags for loom serve (repeatable: --serve-arg=--slice-ms=5)",
    )
    ap.add_argument("--rss-tolerance", type=float, default=0.10)
    ap.add_argument("--rss-floor-mb", type=float, default=96)
    ap.add_argument("--settle-timeout-s", type=float, default=120)
    ap.add_argument("--sample-s", type=float, default=2.0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "soak.json"))
    ap.add_argument("--records-out", help="every well-behaved request as JSON lines")
    args = ap.parse_args(argv)
    args.actors = [a for a in args.actors.split(",") if a]
    unknown = [a for a in args.actors if a not in ACTORS]
    if unknown:
        ap.error(f"unknown actors {unknown}; known: {', '.join(ACTORS)}")
    attack = args.duration_s * (1 - args.idle_fraction)
    if not args.slot_s:
        args.slot_s = min(12.0, max(4.0, attack / (2 * max(1, len(args.actors)))))
    if not args.warmup_slot_s:
        args.warmup_slot_s = min(args.slot_s, 6.0)
    return args


def build_programs() -> tuple[bytes, bytes]:
    from loom.sdk.build import build_inferlet

    good = build_inferlet(ROOT / "inferlets" / "text_completion").read_bytes()
    bad = build_inferlet(ROOT / "benchmarks" / "soak_inferlets" / "hostile", sdk=False)
    return good, bad.read_bytes()


async def upload(server: Server, *wasm: bytes) -> list[str]:
    from loom.client import Client

    async with await Client.connect(server.url, api_key=server.api_key) as c:
        return [await c.upload(w) for w in wasm]


async def warm_up(server: Server, wb: WellBehaved, hostile: str, secs: float) -> list[Any]:
    """The well-behaved clients for ``secs`` (every batch shape they make); checks that the
    hostile program runs. The well-behaved records."""
    from loom.client import Client

    clients = asyncio.create_task(wb.run())
    await asyncio.sleep(secs)
    wb.stop.set()
    await clients
    records, wb.records, wb.stop = wb.records, [], asyncio.Event()
    async with await Client.connect(server.url, api_key=server.api_key) as c:
        status = await (await c.launch(hostile, ["noop"])).wait()
        if not status.ok:
            raise RuntimeError(f"the hostile program does not run: {status.error}")
    return records


def start_hostile(cfg: dict[str, Any]) -> tuple[Any, Any, Any]:
    """The hostile process (``soak_parts.hostile.run``): (process, stop event, tally queue)."""
    from soak_parts.hostile import run

    ctx = multiprocessing.get_context("spawn")
    stop, out = ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=run, args=(cfg, stop, out), name="soak-hostile")
    proc.start()
    return proc, stop, out


async def kill_worker(server: Server, http: Any, at: float, out: dict[str, Any]) -> None:
    """At ``at`` (monotonic), ``kill -9`` the engine worker; then wait for /health to
    report its replacement (the end of the fault window)."""
    await asyncio.sleep(max(0.0, at - time.monotonic()))
    before = (await http.get(server.url + "/health", timeout=30)).json()["engine_restarts"]
    out["old_pid"] = server.kill_worker()
    out["t_kill"] = time.monotonic()
    deadline = out["t_kill"] + 300
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            r = await http.get(server.url + "/health", timeout=10)
            h = r.json()
            if h["engine_restarts"] > before and h["status"] == "ok":
                out["t_recovered"] = time.monotonic()
                out["new_pid"] = server.worker_pid()
                out["health"] = h
                return
        await asyncio.sleep(0.05)
    out["error"] = "the worker was not replaced within 300 s"


async def sampler(server: Server, http: Any, every: float, series: list[dict[str, Any]]) -> None:
    while True:
        with contextlib.suppress(Exception):
            series.append(await snapshot(http, server))
        await asyncio.sleep(every)


async def settle(server: Server, http: Any, pre: dict[str, Any], timeout: float) -> float | None:
    """Wait until nothing is left running or held; the seconds it took (None: not within
    ``timeout``)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        s = await snapshot(http, server)
        quiet = all(s.get(k) == 0 for k in SETTLED) and s.get("health_ms", 1e9) < 200
        if quiet and s.get("pages_held") == pre.get("pages_held"):
            return time.monotonic() - t0
        await asyncio.sleep(0.5)
    return None


def stop_hostile(proc: Any, stop: Any, out: Any, timeout: float = 180) -> dict[str, Any]:
    """Stop the hostile process (``stop``: None lets it end by itself) and get its tally."""
    if stop is not None:
        stop.set()
    try:
        tally: dict[str, Any] = out.get(timeout=timeout)
    except Exception as e:
        tally = {"error": f"the hostile process gave no tally: {e!r}"}
    proc.join(30)
    if proc.is_alive():
        proc.terminate()
        proc.join(10)
    return tally


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    good, bad = build_programs()
    extra = [
        "--http-allow-hosts",
        "127.0.0.1",
        "--max-instances",
        str(args.max_instances),
        "--idle-timeout-s",
        str(args.idle_timeout_s),
        "--max-tree-instances",
        str(args.max_tree_instances),
        "--max-tree-page-share",
        "0.5",  # (off by default; a server shared by strangers sets it)
        *args.serve_arg,
    ]
    server = Server(args.model, API_KEY, extra)
    server.start()
    print(
        f"server on {server.url} (pid {server.pid}, worker {server.worker_pid()}), "
        f"log {server.log}",
        file=sys.stderr,
    )
    series: list[dict[str, Any]] = []
    proc: Any = None
    try:
        async with httpx.AsyncClient(headers=server.headers) as http:
            model = (await http.get(server.url + "/v1/models")).json()["data"][0]["id"]
            program, hostile_program = await upload(server, good, bad)
            pre = await snapshot(http, server)
            wb = WellBehaved(
                server.url,
                API_KEY,
                model,
                program,
                args.concurrency,
                args.max_tokens,
                args.think_ms / 1000,
                args.request_timeout_s,
            )
            warmup = await warm_up(server, wb, hostile_program, args.warmup_s)
            cfg = {
                "url": server.url,
                "api_key": API_KEY,
                "model": model,
                "program": hostile_program,
                "actors": args.actors,
                "slot_s": args.warmup_slot_s,
                "rounds": 1,
                "bad_input_interval_s": args.bad_input_interval_s,
            }
            print(f"warm-up: every hostile actor once, {args.warmup_slot_s:g} s", file=sys.stderr)
            proc, stop, out = start_hostile(cfg)
            warm_tally = await asyncio.to_thread(stop_hostile, proc, None, out, 600)
            proc = None
            warm_settle = await settle(server, http, pre, args.settle_timeout_s)
            sampling = asyncio.create_task(sampler(server, http, args.sample_s, series))
            start = await snapshot(http, server)
            t_start = time.monotonic()
            idle_s = args.duration_s * args.idle_fraction
            attack_s = args.duration_s - idle_s
            clients = asyncio.create_task(wb.run())
            print(f"idle phase: {idle_s:.0f} s", file=sys.stderr)
            await asyncio.sleep(idle_s)
            baseline = await snapshot(http, server)
            t_attack = time.monotonic()
            proc, stop, out = start_hostile(
                {**cfg, "slot_s": args.slot_s, "rounds": 0}  # (until stopped)
            )
            print(
                f"attack phase: {attack_s:.0f} s, {len(args.actors)} hostile actors in turn, "
                f"{args.slot_s:g} s each",
                file=sys.stderr,
            )
            fault: dict[str, Any] = {}
            killer = None
            if not args.no_kill:
                killer = asyncio.create_task(
                    kill_worker(server, http, t_attack + attack_s / 2, fault)
                )
            await asyncio.sleep(attack_s)
            end_attack = await snapshot(http, server)
            t_end = time.monotonic()
            wb.stop.set()
            await clients
            tally = await asyncio.to_thread(stop_hostile, proc, stop, out)
            if killer is not None:
                if not killer.done():
                    fault.setdefault("error", "the kill had not finished when the attack ended")
                killer.cancel()
            print("settling", file=sys.stderr)
            settle_s = await settle(server, http, pre, args.settle_timeout_s)
            await asyncio.sleep(3)
            after = await snapshot(http, server)
            check = await wb.burst(3)
            sampling.cancel()
    finally:
        if proc is not None and proc.is_alive():  # (the soak failed half-way)
            proc.terminate()
        server_rc = None if server.proc is None else server.proc.poll()  # None: still serving
        server.stop()
    timeline = {
        "t_start": t_start,
        "t_attack": t_attack,
        "t_end": t_end,
        "settle_s": settle_s,
        "warm_up_settle_s": warm_settle,
    }
    if args.records_out:
        write_records(Path(args.records_out), t_start, warmup, wb.records, check)
    return report.analyze(
        args=vars(args),
        server_args=server.args,
        server_exit=server_rc,
        records=wb.records,
        warmup=warmup,
        check=check,
        tally=tally,
        warm_tally=warm_tally,
        fault=fault,
        timeline=timeline,
        snaps={
            "pre": pre,
            "start": start,
            "baseline": baseline,
            "end_attack": end_attack,
            "after": after,
        },
        series=series,
    )


def write_records(path: Path, t0: float, *phases: list[Any]) -> None:
    with path.open("w") as f:
        for phase, recs in zip(("warm-up", "soak", "check"), phases, strict=True):
            for r in recs:
                row = {"phase": phase, **r.as_dict(), "start": r.start - t0, "end": r.end - t0}
                f.write(json.dumps(row) + "\n")


def main() -> None:
    args = parse_args()
    result = asyncio.run(soak(args))
    report.print_table(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
