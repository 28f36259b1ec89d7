"""What the soak found, from its records: load held, latency idle vs attack, the fault,
the hostile inputs, the errors of well-behaved clients and the leak checks; the table."""

from __future__ import annotations

import math
import os
import platform
from typing import Any

from soak_parts.clients import KINDS, Record, latency_stats

DEFINITIONS = {
    "errors_well_behaved": (
        "requests of the well-behaved clients (warm-up, idle, attack, and the check after "
        "the soak) that did not end in a 200 with the whole answer: a non-200 status, a "
        "stream without [DONE] and finish_reason length or with an error chunk, fewer "
        "tokens than asked, an inferlet that did not return, no answer within the request "
        "timeout, a broken connection; except requests in flight during the fault window"
    ),
    "fault_window": (
        "from the engine-worker kill until /health first reports the new worker (restarts "
        "+1, status ok); a request overlapping it that fails is 'failed by the injected "
        "fault', not an error; one started after it must succeed"
    ),
    "p99_attack_over_idle": (
        "the largest, over the three kinds of request, of p99 latency (request start to "
        "last byte) of successful requests in the attack phase outside the fault window, "
        "over the same in the idle phase"
    ),
    "leaks": (
        "failed leak checks after the soak settled: KV pages held beyond the prefix cache "
        "back to the pre-run figure; no instance, completion or queued command left; RSS of "
        "the server and of the engine worker within max(rss_tolerance x, rss_floor_mb) of "
        "the warm baseline at the end of the idle phase; server fds and threads within 8"
    ),
}


def analyze(
    *,
    args: dict[str, Any],
    server_args: list[str],
    server_exit: int | None,
    records: list[Record],
    warmup: list[Record],
    check: list[Record],
    tally: dict[str, Any],
    warm_tally: dict[str, Any],
    fault: dict[str, Any],
    timeline: dict[str, Any],
    snaps: dict[str, Any],
    series: list[dict[str, Any]],
) -> dict[str, Any]:
    t0, ta, te = timeline["t_start"], timeline["t_attack"], timeline["t_end"]
    kill, recovered = fault.get("t_kill"), fault.get("t_recovered")

    def in_fault(r: Record) -> bool:
        end = recovered if recovered is not None else math.inf
        return kill is not None and r.start <= end and r.end >= kill

    idle = [r for r in records if r.start < ta]
    attack = [r for r in records if r.start >= ta]
    errors = [r for r in warmup + records + check if not r.ok and not in_fault(r)]
    slots = tally.get("slots", [])

    def active(r: Record) -> list[str]:
        return sorted({s["actor"] for s in slots if s["start"] <= r.end and s["end"] >= r.start})

    latency = {}
    for name, recs in (("idle", idle), ("attack", attack)):
        good = [r for r in recs if r.ok and not in_fault(r)]
        latency[name] = {k: latency_stats([r for r in good if r.kind == k]) for k in KINDS}
        latency[name]["all"] = latency_stats(good)
    ratios = {
        k: _ratio(latency["attack"][k]["p99_ms"], latency["idle"][k]["p99_ms"])
        for k in (*KINDS, "all")
    }
    ratios["stream TTFT"] = _ratio(
        latency["attack"]["stream"]["ttft_p99_ms"], latency["idle"]["stream"]["ttft_p99_ms"]
    )
    worst = max((r for k in KINDS if (r := ratios[k]) is not None), default=None)

    by_actor: dict[str, Any] = {}
    for name in dict.fromkeys(s["actor"] for s in slots):
        mine = [r for r in attack if not in_fault(r) and name in active(r)]
        by_actor[name] = {
            **latency_stats([r for r in mine if r.ok]),
            "errors": sum(not r.ok for r in mine),
        }

    after_recovery = [r for r in records if recovered is not None and r.start > recovered]
    faults = {}
    if kill is not None or fault:
        faults["engine_worker_kill"] = {
            "killed_pid": fault.get("old_pid"),
            "new_pid": fault.get("new_pid"),
            "at_s": _rel(kill, t0),
            "replaced_after_s": _rel(recovered, kill),
            "well_behaved_in_flight": sum(in_fault(r) for r in records),
            "failed_by_fault": sum(in_fault(r) and not r.ok for r in records),
            "failures": [_err(r, t0, active) for r in records if in_fault(r) and not r.ok][:20],
            "requests_after": len(after_recovery),
            "errors_after": sum(not r.ok for r in after_recovery),
            # Replaced, serving at the end, and nothing after it failed for the worker's sake
            # (later failures of other causes are errors of well-behaved clients).
            "survived": recovered is not None
            and snaps["after"].get("status") == "ok"
            and all(r.ok for r in check)
            and not any("worker" in (r.error or "") for r in after_recovery),
            "error": fault.get("error"),
        }

    checks = leak_checks(snaps, args)
    return {
        "leaks": sum(not c["ok"] for c in checks),
        "errors_well_behaved": len(errors) + (server_exit is not None),
        "p99_attack_over_idle": worst,
        "definitions": DEFINITIONS,
        "server_exited_during_the_soak": server_exit,
        "config": {**args, "server_args": server_args},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "timeline_s": {
            "idle": ta - t0,
            "attack": te - ta,
            "settle": timeline["settle_s"],
            "warm_up_settle": timeline["warm_up_settle_s"],
        },
        "load": {
            "idle": _load(idle, snaps["start"], snaps["baseline"], ta - t0),
            "attack": _load(attack, snaps["baseline"], snaps["end_attack"], te - ta),
        },
        "latency_ms": latency,
        "p99_ratio_attack_over_idle": ratios,
        "latency_by_active_actor_ms": by_actor,
        "well_behaved": {
            "requests": len(warmup) + len(records) + len(check),
            "errors": {
                "warm-up": sum(not r.ok for r in warmup),
                "idle": sum(not r.ok and not in_fault(r) for r in idle),
                "attack": sum(not r.ok and not in_fault(r) for r in attack),
                "check after": sum(not r.ok for r in check),
            },
            "failed_by_fault": sum(in_fault(r) and not r.ok for r in records),
            "error_samples": [_err(r, t0, active) for r in errors][:50],
        },
        "faults": faults,
        "hostile": _hostile(tally, t0),
        "hostile_warm_up": {k: v for k, v in _hostile(warm_tally, t0).items() if k != "slots"},
        "leak_checks": checks,
        "snapshots": {k: _strip(v, t0) for k, v in snaps.items()},
        "server_rss_mb_at_each_round": _rounds(snaps, slots, series),
        "series": [_point(s, t0) for s in series[:: max(1, len(series) // 300)]],
    }


def leak_checks(snaps: dict[str, Any], args: dict[str, Any]) -> list[dict[str, Any]]:
    pre, base, after = snaps["pre"], snaps["baseline"], snaps["after"]
    out = []

    def add(name: str, ok: bool, **detail: Any) -> None:
        out.append({"check": name, "ok": bool(ok), **detail})

    held = after.get("pages_held")
    add(
        "KV pages held (beyond the prefix cache) back to the pre-run figure",
        held is not None and held <= pre.get("pages_held", 0),
        pre=pre.get("pages_held"),
        after=held,
        used=after.get("pages_used"),
        cached=after.get("pages_cached"),
    )
    left = {k: after.get(k) for k in ("instances", "instances_running", "completions_running")}
    add("no instance or completion left", all(v == 0 for v in left.values()), **left)
    add(
        "no queued command left",
        after.get("commands_queued") == 0,
        queued=after.get("commands_queued"),
    )
    for proc in ("server", "worker"):
        b, a = base[proc]["rss_mb"], after[proc]["rss_mb"]
        allowed = None if b is None else max(args["rss_tolerance"] * b, args["rss_floor_mb"])
        add(
            f"{proc} RSS growth",
            b is not None and a is not None and a - b <= allowed,
            baseline_mb=b,
            after_mb=a,
            growth_mb=None if None in (a, b) else a - b,
            allowed_mb=allowed,
        )
    for what in ("fds", "threads"):
        b, a = base["server"][what], after["server"][what]
        add(f"server {what}", b is not None and a is not None and a <= b + 8, baseline=b, after=a)
    return out


def _rounds(snaps: dict[str, Any], slots: list[dict[str, Any]], series: list[Any]) -> list[Any]:
    """Server RSS at the warm baseline, at the start of each later round of the hostile
    actors, and after the soak: growth round over round is a leak, a step that stays put
    is memory kept (allocator, caches)."""
    out = [snaps["baseline"]["server"]["rss_mb"]]
    first = slots[0]["actor"] if slots else None
    for slot in slots[1:]:
        if slot["actor"] == first and series:
            near = min(series, key=lambda p: abs(p["t"] - slot["start"]))
            out.append(near["server"]["rss_mb"])
    return [*out, snaps["after"]["server"]["rss_mb"]]


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _rel(t: float | None, t0: float | None) -> float | None:
    return None if t is None or t0 is None else t - t0


def _err(r: Record, t0: float, active: Any) -> dict[str, Any]:
    return {
        "kind": r.kind,
        "at_s": round(r.start - t0, 2),
        "latency_s": round(r.latency, 3),
        "error": r.error,
        "hostile_active": active(r),
    }


def _load(
    recs: list[Record], s0: dict[str, Any], s1: dict[str, Any], secs: float
) -> dict[str, Any]:
    ok = [r for r in recs if r.ok]

    def rate(key: str) -> float | None:
        a, b = s0.get(key), s1.get(key)
        return None if a is None or b is None else (b - a) / secs

    return {
        "seconds": secs,
        "requests": len(recs),
        "ok": len(ok),
        "requests_per_s": len(ok) / secs,
        "client_tokens_per_s": sum(r.tokens for r in ok) / secs,
        "inferlets_completed": sum(r.kind == "inferlet" for r in ok),
        "engine_tokens_per_s": rate("engine_tokens"),
        "generated_tokens_per_s": rate("generated_tokens"),
        "instances_started": None if (spawned := rate("spawned")) is None else spawned * secs,
    }


def _hostile(tally: dict[str, Any], t0: float) -> dict[str, Any]:
    tried = tally.get("tried", {})
    return {
        "tried_total": sum(tried.values()),
        "tried": tried,
        "outcomes": tally.get("outcomes", {}),
        "unexpected": [{**u, "t": round(u["t"] - t0, 2)} for u in tally.get("unexpected", [])],
        "slots": [
            {
                "actor": s["actor"],
                "start_s": round(s["start"] - t0, 2),
                "end_s": round(s["end"] - t0, 2),
            }
            for s in tally.get("slots", [])
        ],
        **({"error": tally["error"]} if "error" in tally else {}),
    }


def _strip(s: dict[str, Any], t0: float) -> dict[str, Any]:
    return {**s, "t": round(s["t"] - t0, 2)}


def _point(s: dict[str, Any], t0: float) -> dict[str, Any]:
    return {
        "t": round(s["t"] - t0, 1),
        "server_rss_mb": s["server"]["rss_mb"],
        "worker_rss_mb": s["worker"]["rss_mb"],
        "worker_pid": s.get("worker_pid"),
        "pages_used": s.get("pages_used"),
        "pages_held": s.get("pages_held"),
        "instances": s.get("instances"),
    }


def _f(x: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def print_table(res: dict[str, Any]) -> None:
    cfg, load, lat = res["config"], res["load"], res["latency_ms"]
    tl = res["timeline_s"]
    settled = (
        f"settled in {tl['settle']:.1f} s"
        if tl["settle"] is not None
        else f"NOT settled within {cfg['settle_timeout_s']:g} s"
    )
    print(
        f"\nsoak: {tl['idle']:.0f} s idle + {tl['attack']:.0f} s attack, model {cfg['model']}, "
        f"{cfg['concurrency']} well-behaved clients, {cfg['max_tokens']} tokens, think "
        f"{cfg['think_ms']:g} ms; {settled}"
    )
    print(f"\n{'load held':<26} | {'idle':>10} | {'attack':>10}")
    for key, label in (
        ("requests_per_s", "requests/s (well-behaved)"),
        ("client_tokens_per_s", "tokens/s (well-behaved)"),
        ("inferlets_completed", "inferlets completed"),
        ("engine_tokens_per_s", "engine tokens/s (all)"),
        ("instances_started", "instances started (all)"),
    ):
        print(f"{label:<26} | {_f(load['idle'][key]):>10} | {_f(load['attack'][key]):>10}")
    print(
        f"\n{'latency (ms)':<14} | {'idle p50':>9} | {'idle p99':>9} | {'atk p50':>9} | "
        f"{'atk p99':>9} | {'p99 ratio':>9}"
    )
    ratios = res["p99_ratio_attack_over_idle"]
    rows = [(k, k, "p50_ms", "p99_ms") for k in (*KINDS, "all")]
    rows.insert(1, ("stream TTFT", "stream", "ttft_p50_ms", "ttft_p99_ms"))
    for label, kind, p50, p99 in rows:
        i, a = lat["idle"][kind], lat["attack"][kind]
        print(
            f"{label:<14} | {_f(i[p50]):>9} | {_f(i[p99]):>9} | {_f(a[p50]):>9} | "
            f"{_f(a[p99]):>9} | {_f(ratios[label], '{:.2f}x'):>9}"
        )
    by_actor = res["latency_by_active_actor_ms"]
    if by_actor:
        print(
            f"\n{'attack, by hostile actor':<26} | {'n':>5} | {'p50 ms':>8} | {'p99 ms':>8} | "
            f"{'max ms':>8} | {'errors':>6}"
        )
    for name, st in by_actor.items():
        print(
            f"{name:<26} | {st['n']:>5} | {_f(st['p50_ms']):>8} | {_f(st['p99_ms']):>8} | "
            f"{_f(st['max_ms']):>8} | {st['errors']:>6}"
        )
    for name, f in res["faults"].items():
        print(
            f"\nfault: {name} at {_f(f['at_s'])} s, replaced after "
            f"{_f(f['replaced_after_s'], '{:.2f}')} s; {f['well_behaved_in_flight']} "
            f"well-behaved requests in the window, "
            f"{f['failed_by_fault']} failed by it; {f['requests_after']} after, "
            f"{f['errors_after']} failed; survived: {f['survived']}"
        )
    hostile = res["hostile"]
    print(
        f"\nhostile inputs tried: {hostile['tried_total']} "
        f"(unexpected answers: {len(hostile['unexpected'])})"
    )
    for kind in dict.fromkeys([*hostile["tried"], *hostile["outcomes"]]):
        outcomes = ", ".join(f"{k} {v}" for k, v in hostile["outcomes"].get(kind, {}).items())
        print(f"  {kind:<38} {hostile['tried'].get(kind, ''):>5}  {outcomes}"[:200])
    for u in hostile["unexpected"][:10]:
        print(f"  UNEXPECTED at {u['t']} s: {u['kind']}: {u['detail']}"[:200])
    wb = res["well_behaved"]
    print(
        f"\nerrors of well-behaved clients: {res['errors_well_behaved']} of {wb['requests']} "
        f"({', '.join(f'{k} {v}' for k, v in wb['errors'].items())}); failed by the "
        f"injected fault: {wb['failed_by_fault']}"
    )
    for e in wb["error_samples"][:10]:
        print(
            f"  {e['at_s']:>7} s {e['kind']:<8} {e['error']} [{', '.join(e['hostile_active'])}]"[
                :200
            ]
        )
    print(f"\nleaks: {res['leaks']} of {len(res['leak_checks'])} checks failed")
    for c in res["leak_checks"]:
        detail = ", ".join(
            f"{k} {_f(v) if isinstance(v, float) else v}"
            for k, v in c.items()
            if k not in ("check", "ok")
        )
        print(f"  {'ok ' if c['ok'] else 'LEAK'} {c['check']}: {detail}"[:200])
    rounds = " -> ".join(_f(x, "{:.0f}") for x in res["server_rss_mb_at_each_round"])
    print(f"  server RSS MB, baseline -> each later round's start -> after: {rounds}")
    print(
        f"\np99 attack / idle (worst kind): {_f(res['p99_attack_over_idle'], '{:.2f}x')} "
        f"(goal <= 2x)"
    )
