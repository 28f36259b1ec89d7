"""ReAct agent: Thought / Action / Observation, its tools called over HTTP from inside
the server, its context kept whole between steps (no re-prefill after a tool call).

    loom run inferlets/agent_react -- --tools http://127.0.0.1:8801 "What is 12 * 7?"

Simple use: ``[--tools URL] [--steps N] [--tokens T] question``; each step searches for
the question, then looks up a fact, then calculates. Benchmarks pass one JSON argument
instead, fixing the workload (random weights emit no actions of their own):

    {"system": str, "docs": str, "question": str, "step_tokens": int,
     "answer_tokens": int, "steps": [[tool URL, ...], ...], "share_prefix": str | null,
     "overlap": bool, "concurrent_tools": bool, "drop_docs": bool}

- ``share_prefix``: the system prompt is computed once per server under this name and
  imported by every agent (``inferlet.sharing``); null: each agent prefills its own.
- ``overlap``: a step's tool calls start once half its tokens are generated (the point
  where the action is decided) and run while the rest is generated.
- ``concurrent_tools``: a step's tool calls run at once rather than one after another.
- ``drop_docs``: once the first step has chosen its tools, the tool documentation
  (``docs``, which follows the system prompt) is hidden and its pages let go of, so
  later steps attend over less.

Each step generates ``step_tokens`` (ending early at "Action:"), then fills
``Action: <tool>`` and ``Observation: <reply>`` for each tool call; a tool that fails or
times out gives an observation starting with "error:", and the agent goes on. The reply
is JSON: ``{"answer", "tool_calls", "tool_errors", "generated", "docs_pages_dropped"}``.
"""

import json

import inferlet
from inferlet.sharing import prefix_context

SYSTEM = (
    "You are a careful assistant that answers questions by reasoning step by step and "
    "using tools. Write a Thought, then an Action naming one tool and its input, then "
    "read the Observation the tool returns.\n"
)
DOCS = (
    "Tools: search[query] finds passages of a text corpus; fact[key] returns a stored "
    "fact; calc[expression] evaluates arithmetic.\n"
)


def _config(args: list[str]) -> dict:
    if args and args[0].startswith("{"):
        return json.loads(args[0])
    tools, steps, tokens, rest = "http://127.0.0.1:8801", 3, 24, []
    i = 0
    while i < len(args):
        if args[i] in ("--tools", "--steps", "--tokens") and i + 1 < len(args):
            value = args[i + 1]
            if args[i] == "--tools":
                tools = value.rstrip("/")
            elif args[i] == "--steps":
                steps = int(value)
            else:
                tokens = int(value)
            i += 2
        else:
            rest.append(args[i])
            i += 1
    question = " ".join(rest) or "What is 12 * 7?"
    plan = [
        f"{tools}/search?q={_quote(question)}",
        f"{tools}/fact?key=capital-of-france",
        f"{tools}/calc?expr={_quote('12*7')}",
    ]
    return {
        "system": SYSTEM, "docs": DOCS, "question": question, "step_tokens": tokens,
        "answer_tokens": tokens,
        "steps": [[plan[k % len(plan)]] for k in range(steps)], "share_prefix": "react-system",
        "overlap": True, "concurrent_tools": True, "drop_docs": True,
    }  # fmt: skip


def _quote(text: str) -> str:
    safe = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.~"
    return "".join(c if c in safe else "%" + "%".join(f"{b:02X}" for b in c.encode()) for c in text)


def _action(url: str) -> str:
    """``tool[input]`` for the transcript, from a tool URL."""
    path = url.split("://", 1)[-1].split("/", 1)[-1]
    tool, _, query = path.partition("?")
    return f"{tool}[{query.partition('=')[2]}]"


async def call_tool(url: str) -> tuple[str, bool]:
    """(observation, ok): a failed call is an observation the agent reads, not a crash."""
    try:
        resp = await inferlet.http_get(url)
    except RuntimeError as e:  # refused by the policy, unreachable, timed out
        return f"error: {e}", False
    text = " ".join(resp.text.split())[:400]
    if resp.status != 200:
        return f"error: status {resp.status}: {text}", False
    return text, True


async def run_tools(urls: list[str], concurrent: bool) -> list[tuple[str, bool]]:
    if concurrent:
        return await inferlet.gather(*(call_tool(u) for u in urls))
    return [await call_tool(u) for u in urls]


async def main(args: list[str]) -> str | None:
    cfg = _config(args)
    model = inferlet.get_model()
    system, docs = cfg["system"], cfg.get("docs", "")
    ctx = await prefix_context(model, cfg.get("share_prefix"), system + docs)
    # The documentation's token span (a boundary token merged across it stays visible).
    encode = model.tokenizer.encode
    docs_span = (len(encode(system)), len(encode(system + docs)) - 1)
    ctx.fill(f"Question: {cfg['question']}\n")
    tokens, answer_tokens = int(cfg["step_tokens"]), int(cfg.get("answer_tokens", 0))
    stop = inferlet.StopStrings("Action:") | inferlet.IgnoreEos()
    calls = errors = generated = dropped = 0
    for urls in cfg["steps"]:
        ctx.fill("Thought:")
        if cfg.get("overlap") and tokens > 1:
            # The action is decided halfway through the step: its tools start now and run
            # while the model writes the rest.
            before = len(ctx.tokens)
            first = await ctx.generate(max_tokens=tokens // 2, stop=stop)
            pending = inferlet.spawn(run_tools(urls, bool(cfg.get("concurrent_tools"))))
            if "Action:" not in first:
                await ctx.generate(max_tokens=tokens - tokens // 2, stop=stop)
            results = await pending
        else:
            before = len(ctx.tokens)
            await ctx.generate(max_tokens=tokens, stop=stop)
            results = await run_tools(urls, bool(cfg.get("concurrent_tools")))
        generated += len(ctx.tokens) - before
        for url, (observation, ok) in zip(urls, results, strict=True):
            calls += 1
            errors += not ok
            ctx.fill(f"\nAction: {_action(url)}\nObservation: {observation}\n")
        if docs and cfg.get("drop_docs") and docs_span[0] < docs_span[1]:
            dropped = ctx.drop_tokens(*docs_span)
            docs = ""
    answer = ""
    if answer_tokens:
        ctx.fill("Final Answer:")
        answer = await ctx.generate(max_tokens=answer_tokens, stop=inferlet.IgnoreEos())
    ctx.release()
    reply = {"answer": answer, "tool_calls": calls, "tool_errors": errors,
             "generated": generated, "docs_pages_dropped": dropped}  # fmt: skip
    return json.dumps(reply)
