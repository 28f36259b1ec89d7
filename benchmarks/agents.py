"""Agents in the server against agents driven by a client, side by side in one run.

The same ReAct workload three ways, against real `loom serve` processes and a real tool
server (``loom.testing.tool_server``, 127.0.0.1):

- inferlet: ``inferlets/agent_react`` launched over the WebSocket protocol; its tools
  called from inside the server, its context kept through tool calls, the system prompt
  computed once per server and imported (``share_prefix``), tool calls overlapped with
  the rest of a step's generation;
- cache on: the agent loop in this process (as people run agents on vLLM or SGLang):
  each step sends the whole transcript to ``/v1/completions`` and calls the tools
  itself; the server's automatic prefix cache on;
- cache off: the same, against a server started with ``--no-prefix-cache``.

Each agent: a system prompt with tool documentation (~430 tokens), a question, ``steps``
steps of ``step_tokens`` generated tokens (ending early at "Action:"), each followed by
its tool calls (``tools_per_step``, each ``latency`` ms at the tool server) whose
observations are filled back, then a short final answer. Random weights emit no actions
of their own: the plan of tool calls is fixed, so every system does the same work.

Reported per point: agents completed per minute, mean and p99 agent latency, and the
engine's tokens per agent beyond the generated ones (prefill work, from ``/metrics``).
Writes ``benchmarks/results/agents.json`` (``summary``: the inferlets' speed-up in
throughput over each baseline at the best concurrency >= 32 of the first model) and a PNG.

    python benchmarks/agents.py [--models small,tiny] [--concurrency 1,8,32,64,128] \\
        [--latency-ms 0,50,200] [--steps 6] [--step-tokens 24] [--kv-tokens 32768] \\
        [--engine-step-ms 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

SYSTEMS = ("inferlet", "cache_on", "cache_off")
# The inferlet's techniques, all on in the "inferlet" system.
TECHNIQUES: dict[str, Any] = {
    "share_prefix": "bench-react-system", "overlap": True, "concurrent_tools": True,
    "drop_docs": True,
}  # fmt: skip
NONE: dict[str, Any] = {k: None if k == "share_prefix" else False for k in TECHNIQUES}
# The ReAct case study: (name, the server's prefix cache on, the inferlet's switches),
# each row adding one technique to the one before.
CASE_STUDY: list[tuple[str, bool, dict[str, Any]]] = [
    ("keep KV through tool calls", False, NONE),
    ("+ automatic prefix cache", True, NONE),
    ("+ shared system prompt", True, {**NONE, "share_prefix": TECHNIQUES["share_prefix"]}),
    ("+ tools during generation", True, {**NONE, "share_prefix": TECHNIQUES["share_prefix"],
                                         "overlap": True}),
    ("+ concurrent tool calls", True, {**TECHNIQUES, "drop_docs": False}),
    ("+ tool docs dropped", True, TECHNIQUES),
]  # fmt: skip
TOOLS = ("search?q={q}", "fact?key=capital-of-france", "calc?expr=12*{i}%2B{k}")


INSTRUCTIONS = (
    "You are a careful assistant that answers questions by reasoning step by step and "
    "using tools. Each step, write a Thought, then an Action naming one tool and its "
    "input; the tool's reply comes back as an Observation. When you know the answer, "
    "write Final Answer followed by the answer. Use a tool only when the question needs "
    "it, never twice in a row with the same input, and read each observation before "
    "the next thought.\n"
)


def tool_docs() -> str:
    """~250 tokens of tool documentation (after the instructions; an agent may drop it
    once it has chosen its tools)."""
    tools = [
        ("search", "finds passages of the corpus that share words with the query.", "river"),
        ("fact", "returns a stored fact by its key.", "capital-of-france"),
        ("calc", "evaluates an arithmetic expression.", "12*7"),
        ("run", "runs a short Python program and returns its output.", "print(1)"),
        ("lookup", "returns the definition of a word from the glossary.", "mill"),
    ]
    return "".join(
        f"Tool {name}: {what} Example: {name}[{example}].\n" for name, what, example in tools
    )


def system_prompt() -> str:
    """Instructions and tool documentation (~430 tokens, the same for every agent)."""
    return INSTRUCTIONS + tool_docs()


def plan(agent: int, steps: int, per_step: int, url: str, latency_ms: float) -> list[list[str]]:
    """The tool URLs of each step of ``agent`` (fixed: the workload is the same for all)."""
    out = []
    for k in range(steps):
        calls = []
        for c in range(per_step):
            tool = TOOLS[(k + c) % len(TOOLS)].format(q=f"river+mill+{agent}", i=agent, k=k)
            sep = "&" if "?" in tool else "?"
            calls.append(f"{url}/{tool}{sep}delay_ms={latency_ms:g}")
        out.append(calls)
    return out


def action(url: str) -> str:
    """``tool[input]`` as the transcript shows a call (the inferlet writes the same)."""
    path = url.split("://", 1)[-1].split("/", 1)[-1]
    tool, _, query = path.partition("?")
    return f"{tool}[{query.partition('=')[2]}]"


# ----- the client-driven baseline -----


async def client_tool(http: Any, url: str) -> str:
    try:
        r = await http.get(url)
    except Exception as e:  # the agent reads the error, as the inferlet does
        return f"error: request failed: {e}"
    text = " ".join(r.text.split())[:400]
    return text if r.status_code == 200 else f"error: status {r.status_code}: {text}"


async def client_agent(http: Any, tools_http: Any, model: str, cfg: dict[str, Any]) -> float:
    """One agent driven from the client; its latency."""
    t0 = time.perf_counter()
    transcript = cfg["system"] + cfg["docs"] + f"Question: {cfg['question']}\n"

    async def complete(max_tokens: int, stop: list[str]) -> str:
        body = {"model": model, "prompt": transcript, "max_tokens": max_tokens,
                "temperature": 0, "stop": stop, "ignore_eos": True}  # fmt: skip
        import httpx

        try:
            r = await http.post("/v1/completions", json=body)
        except (httpx.ReadError, httpx.RemoteProtocolError):
            # A pooled connection the server closed as idle just as it was reused (the
            # request never reached it): once more, on a new connection.
            r = await http.post("/v1/completions", json=body)
        r.raise_for_status()
        return str(r.json()["choices"][0]["text"])

    for urls in cfg["steps"]:
        transcript += "Thought:"
        transcript += await complete(cfg["step_tokens"], ["Action:"])
        if cfg["concurrent_tools"]:
            observations = await asyncio.gather(*(client_tool(tools_http, u) for u in urls))
        else:
            observations = [await client_tool(tools_http, u) for u in urls]
        for url, obs in zip(urls, observations, strict=True):
            transcript += f"\nAction: {action(url)}\nObservation: {obs}\n"
    if cfg["answer_tokens"]:
        transcript += "Final Answer:"
        await complete(cfg["answer_tokens"], [])
    return time.perf_counter() - t0


async def run_clients(url: str, model: str, cfgs: list[dict[str, Any]]) -> list[float]:
    import httpx

    limits = httpx.Limits(max_connections=len(cfgs) * 2, max_keepalive_connections=len(cfgs))
    async with (
        httpx.AsyncClient(base_url=url, timeout=1800, limits=limits) as http,
        httpx.AsyncClient(timeout=60, limits=limits) as tools_http,
    ):
        return list(await asyncio.gather(*(client_agent(http, tools_http, model, c) for c in cfgs)))


# ----- the inferlets -----


async def run_inferlets(url: str, wasm: bytes, cfgs: list[dict[str, Any]]) -> list[float]:
    from loom.client import Client

    async with await Client.connect(url) as client:
        program = await client.upload(wasm)

        async def one(cfg: dict[str, Any]) -> float:
            t0 = time.perf_counter()
            inst = await client.launch(program, [json.dumps(cfg)])
            status = await inst.wait()
            if not status.ok:
                raise RuntimeError(f"agent failed: {status.error}")
            return time.perf_counter() - t0

        return list(await asyncio.gather(*(one(c) for c in cfgs)))


# ----- measuring -----


def scrape(url: str) -> dict[str, float]:
    import httpx

    out: dict[str, float] = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("loom_engine_pass_tokens") or line.startswith("loom_engine_passes"):
            name, value = line.rsplit(" ", 1)
            out[name.removesuffix("_total")] = float(value)
    return out


def measure(
    system: str, url: str, model: str, wasm: bytes, cfgs: list[dict[str, Any]], generated: int
) -> dict[str, Any]:
    before = scrape(url)
    t0 = time.perf_counter()
    if system == "inferlet":
        lat = asyncio.run(run_inferlets(url, wasm, cfgs))
    else:
        lat = asyncio.run(run_clients(url, model, cfgs))
    wall = time.perf_counter() - t0
    after = scrape(url)
    tokens = after["loom_engine_pass_tokens"] - before["loom_engine_pass_tokens"]
    lat.sort()
    return {
        "agents_per_min": 60 * len(cfgs) / wall,
        "wall_s": wall,
        "latency_mean_s": statistics.fmean(lat),
        "latency_p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "prefill_tokens_per_agent": max(0.0, tokens / len(cfgs) - generated),
        "passes": after["loom_engine_passes"] - before["loom_engine_passes"],
    }


_RUNS = iter(range(1_000_000))


def configs(
    n: int,
    args: argparse.Namespace,
    latency: float,
    tools_url: str,
    switches: dict[str, Any] = TECHNIQUES,
) -> list[dict[str, Any]]:
    """``n`` agents; each call's agents are new ones (their questions differ from every
    earlier call's, as new tasks do): no system finds a transcript of an earlier
    measurement in a prefix cache, only the shared system prompt and tool docs."""
    run = next(_RUNS)

    def one(i: int) -> dict[str, Any]:
        return {
            "system": INSTRUCTIONS, "docs": tool_docs(),
            "question": f"Task {run}.{i}: where did the traders meet?",
            "step_tokens": args.step_tokens, "answer_tokens": args.answer_tokens,
            "steps": plan(i, args.steps, args.tools_per_step, tools_url, latency),
            **switches,
        }  # fmt: skip

    return [one(i) for i in range(n)]


def start(model_path: str, port: int, args: argparse.Namespace, cache: bool) -> Any:
    from serving import start_server

    page = 16
    extra = [
        "--dtype", args.dtype, "--num-pages", str(args.kv_tokens // page),
        "--http-allow-hosts", "127.0.0.1", "--prefix-cache" if cache else "--no-prefix-cache",
    ]  # fmt: skip
    if args.engine_step_ms:
        extra += ["--engine-step-ms", str(args.engine_step_ms)]
    return start_server(model_path, port, tuple(extra))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default="small,tiny", help="small, tiny, micro")
    ap.add_argument("--concurrency", default="1,8,32,64,128")
    ap.add_argument("--latency-ms", default="0,50,200", help="tool latencies")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--step-tokens", type=int, default=24)
    ap.add_argument("--answer-tokens", type=int, default=8)
    ap.add_argument("--tools-per-step", type=int, default=1)
    ap.add_argument("--kv-tokens", type=int, default=32768, help="the KV pool, in tokens")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--engine-step-ms", type=float, default=0.0, help="gpu-like: ms per pass")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument(
        "--case-repeats",
        type=int,
        default=3,
        help="rounds of the case study (each variant's median is reported)",
    )
    ap.add_argument("--case-study", type=int, default=0, metavar="N",
                    help="also run the ReAct case study (techniques added one at a time) "
                         "with N agents, on the first model and tool latency")  # fmt: skip
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "agents.json")
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    latencies = [float(x) for x in args.latency_ms.split(",")]
    systems = [s for s in args.systems.split(",") if s]

    import httpx

    from engine_throughput import model_dir
    from loom.sdk.build import build_inferlet
    from loom.testing.tool_server import ToolServer
    from serving import free_port

    wasm = build_inferlet(ROOT / "inferlets" / "agent_react").read_bytes()
    generated = args.steps * args.step_tokens + args.answer_tokens
    rows: list[dict[str, Any]] = []
    study: list[dict[str, Any]] = []
    with ToolServer() as tools:
        for model_name in args.models.split(","):
            cache = Path.home() / ".cache" / "loom"
            path = "tiny" if model_name == "tiny" else str(model_dir(model_name, cache))
            ports = {"on": free_port(), "off": free_port()}
            servers = {k: start(path, p, args, k == "on") for k, p in ports.items()}
            urls = {k: f"http://127.0.0.1:{p}" for k, p in ports.items()}
            try:
                model = httpx.get(urls["on"] + "/v1/models").json()["data"][0]["id"]
                warm = configs(2, args, 0, tools.url)
                for system in systems:  # warm-up: builds, compiles, the shared prefix
                    url = urls["off" if system == "cache_off" else "on"]
                    measure(system, url, model, wasm, warm, generated)
                for latency in latencies:
                    for n in levels:
                        for system in systems:
                            cfgs = configs(n, args, latency, tools.url)
                            url = urls["off" if system == "cache_off" else "on"]
                            row = measure(system, url, model, wasm, cfgs, generated)
                            row.update(model=model_name, system=system, concurrency=n,
                                       latency_ms=latency)  # fmt: skip
                            rows.append(row)
                            rate = row["agents_per_min"]
                            print(f"  {model_name} {latency:g} ms x{n} {system}: {rate:.1f}/min",
                                  file=sys.stderr)  # fmt: skip
                if args.case_study and model_name == args.models.split(",")[0]:
                    study += case_study(args, urls, model, wasm, tools.url, generated)
            finally:
                for s in servers.values():
                    s.terminate()
                    s.wait(30)
    print_table(rows, args)
    if study:
        print_case_study(study)
    summary = summarize(rows, args.models.split(",")[0])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                    "summary": summary, "rows": rows, "case_study": study},
                                   indent=2))  # fmt: skip
    print(f"summary: {json.dumps(summary)}\nwrote {args.out}")
    plot(rows, args.out.with_suffix(".png"))


def case_study(
    args: argparse.Namespace,
    urls: dict[str, str],
    model: str,
    wasm: bytes,
    tools_url: str,
    generated: int,
) -> list[dict[str, Any]]:
    """The inferlet with its techniques added one at a time, then both baselines, at
    ``args.case_study`` agents and the first tool latency."""
    n, latency = args.case_study, float(args.latency_ms.split(",")[0])
    variants: list[tuple[str, str, str, dict[str, Any]]] = [
        (name, "inferlet", "on" if cache else "off", switches)
        for name, cache, switches in CASE_STUDY
    ] + [
        ("client-driven, prefix cache on", "cache_on", "on", TECHNIQUES),
        ("client-driven, prefix cache off", "cache_off", "off", TECHNIQUES),
    ]  # fmt: skip
    runs: dict[str, list[dict[str, Any]]] = {v[0]: [] for v in variants}
    for r in range(args.case_repeats):  # rounds over every variant: noise hits them alike
        for name, system, server, switches in variants:
            if system == "cache_off" and r:
                continue  # (slow, and far from the rest: one run says enough)
            cfgs = configs(n, args, latency, tools_url, switches)
            row = measure(system, urls[server], model, wasm, cfgs, generated)
            runs[name].append(row)
            print(f"  case study x{n} round {r}: {name}: {row['agents_per_min']:.1f}/min",
                  file=sys.stderr)  # fmt: skip
    out = []
    for name, *_ in variants:
        rows = sorted(runs[name], key=lambda row: row["agents_per_min"])
        median = rows[len(rows) // 2]
        out.append({"technique": name, "runs": len(rows), **median,
                    "concurrency": n, "latency_ms": latency})  # fmt: skip
    return out


def print_case_study(study: list[dict[str, Any]]) -> None:
    n, lat = study[0]["concurrency"], study[0]["latency_ms"]
    print(
        f"\nReAct case study: {n} agents, tools {lat:g} ms, each row adds one technique "
        f"(median of {study[0]['runs']} rounds)\n"
    )
    head = (f"{'technique':<36} | {'agents/min':>10} | {'gain':>6} | {'total':>6} | "
            f"{'mean s':>7} | {'prefill/agent':>13}")  # fmt: skip
    print(head)
    print("-" * len(head))
    first = prev = study[0]["agents_per_min"]
    for r in study:
        rate = r["agents_per_min"]
        print(f"{r['technique']:<36} | {rate:>10.1f} | {rate / prev:>5.2f}x | "
              f"{rate / first:>5.2f}x | {r['latency_mean_s']:>7.2f} | "
              f"{r['prefill_tokens_per_agent']:>13.0f}")  # fmt: skip
        if not r["technique"].startswith("client"):
            prev = rate


def summarize(rows: list[dict[str, Any]], model: str) -> dict[str, Any]:
    """The inferlets' throughput over each baseline, at the concurrency >= 32 (and tool
    latency) where the inferlets did best, on ``model``."""
    by = {(r["system"], r["concurrency"], r["latency_ms"]): r for r in rows if r["model"] == model}
    points = [(n, lat) for (s, n, lat) in by if s == "inferlet" and n >= 32]
    if not points:
        return {}
    n, lat = max(points, key=lambda p: by[("inferlet", *p)]["agents_per_min"])
    best = by[("inferlet", n, lat)]["agents_per_min"]
    out: dict[str, Any] = {"model": model, "concurrency": n, "latency_ms": lat}
    for base in ("cache_off", "cache_on"):
        if (base, n, lat) in by:
            ratio = best / by[(base, n, lat)]["agents_per_min"]
            out[f"speedup_vs_baseline_{base}"] = round(ratio, 3)
    return out


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    timing = f"gpu-like {args.engine_step_ms:g} ms/pass" if args.engine_step_ms else "real"
    print(f"\nReAct agents: {args.steps} steps x {args.step_tokens} tokens, "
          f"{args.tools_per_step} tool call(s) per step, KV pool {args.kv_tokens} tokens, "
          f"{args.dtype}, engine timing {timing}\n")  # fmt: skip
    head = (f"{'model':<6} | {'tool ms':>7} | {'agents':>6} | {'system':<9} | "
            f"{'agents/min':>10} | {'vs cache on':>11} | {'mean s':>7} | {'p99 s':>7} | "
            f"{'prefill/agent':>13}")  # fmt: skip
    print(head)
    print("-" * len(head))
    by = {(r["model"], r["system"], r["concurrency"], r["latency_ms"]): r for r in rows}
    for r in rows:
        on = by.get((r["model"], "cache_on", r["concurrency"], r["latency_ms"]))
        ratio = f"{r['agents_per_min'] / on['agents_per_min']:.2f}x" if on else "-"
        print(f"{r['model']:<6} | {r['latency_ms']:>7g} | {r['concurrency']:>6} | "
              f"{r['system']:<9} | {r['agents_per_min']:>10.1f} | {ratio:>11} | "
              f"{r['latency_mean_s']:>7.2f} | {r['latency_p99_s']:>7.2f} | "
              f"{r['prefill_tokens_per_agent']:>13.0f}")  # fmt: skip


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    keys = sorted({(r["model"], r["latency_ms"]) for r in rows})
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False)
    for ax, (model, lat) in zip(axes[0], keys, strict=True):
        for system in SYSTEMS:
            mine = [
                r
                for r in rows
                if (r["model"], r["latency_ms"], r["system"]) == (model, lat, system)
            ]
            pts = sorted((r["concurrency"], r["agents_per_min"]) for r in mine)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=system)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{model}, tools {lat:g} ms")
        ax.set_xlabel("concurrent agents")
        ax.set_ylabel("agents / min")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
