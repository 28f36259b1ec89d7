"""CodeAct agent: each action is a Python program, run by the tool server's code runner
(a subprocess under a time and memory limit); its output is the observation.

    loom run inferlets/agent_codeact -- --tools http://127.0.0.1:8801 "Sum the squares below 10"

Simple use: ``[--tools URL] [--steps N] [--tokens T] question``: the steps run a few
fixed programs. Benchmarks and tests pass one JSON argument fixing the workload (random
weights write no programs of their own):

    {"system": str, "question": str, "tools": URL, "step_tokens": int,
     "answer_tokens": int, "programs": [str, ...], "share_prefix": str | null,
     "overlap": bool}

- ``share_prefix``: the system prompt is computed once per server under this name.
- ``overlap``: a program starts once half the step's tokens are generated (the point
  where it is written) and runs while the model writes the rest.

A program that fails, runs out of time or memory gives its error output as the
observation ("error: ..." first), and the agent goes on. The reply is JSON:
``{"answer", "runs", "run_errors", "generated"}``.
"""

import json

import inferlet
from inferlet.sharing import prefix_context

SYSTEM = (
    "You are an assistant that solves tasks by writing Python. Each step, write a "
    "Thought, then the code to run between <code> and </code>; its output comes back as "
    "an Observation. Print what you need to see. When done, write Final Answer.\n"
)
PROGRAMS = [
    "print(sum(i * i for i in range(10)))",
    "import math\nprint(round(math.pi, 4))",
    "print(sorted(['mill', 'river', 'grain']))",
]


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
    return {
        "system": SYSTEM, "question": " ".join(rest) or "Sum the squares below 10.",
        "tools": tools, "step_tokens": tokens, "answer_tokens": tokens,
        "programs": [PROGRAMS[k % len(PROGRAMS)] for k in range(steps)],
        "share_prefix": "codeact-system", "overlap": True,
    }  # fmt: skip


async def run_program(tools: str, code: str) -> tuple[str, bool]:
    """(observation, ok) of running ``code`` with the code runner."""
    try:
        resp = await inferlet.http_post(f"{tools}/run", code)
    except RuntimeError as e:
        return f"error: {e}", False
    out = resp.text.strip()[-600:]
    if resp.status != 200:
        return f"error: exit status {resp.headers.get('x-exit-status', '?')}: {out}", False
    return out, True


async def main(args: list[str]) -> str | None:
    cfg = _config(args)
    model = inferlet.get_model()
    ctx = await prefix_context(model, cfg.get("share_prefix"), cfg["system"])
    ctx.fill(f"Task: {cfg['question']}\n")
    tokens, tools = int(cfg["step_tokens"]), cfg["tools"].rstrip("/")
    stop = inferlet.StopStrings("<code>") | inferlet.IgnoreEos()
    runs = errors = generated = 0
    for code in cfg["programs"]:
        ctx.fill("Thought:")
        before = len(ctx.tokens)
        if cfg.get("overlap") and tokens > 1:
            await ctx.generate(max_tokens=tokens // 2, stop=stop)
            running = inferlet.spawn(run_program(tools, code))
            await ctx.generate(max_tokens=tokens - tokens // 2, stop=stop)
            observation, ok = await running
        else:
            await ctx.generate(max_tokens=tokens, stop=stop)
            observation, ok = await run_program(tools, code)
        generated += len(ctx.tokens) - before
        runs += 1
        errors += not ok
        ctx.fill(f"\n<code>\n{code}\n</code>\nObservation: {observation}\n")
    answer = ""
    if cfg.get("answer_tokens"):
        ctx.fill("Final Answer:")
        answer = await ctx.generate(max_tokens=int(cfg["answer_tokens"]), stop=inferlet.IgnoreEos())
    ctx.release()
    return json.dumps(
        {"answer": answer, "runs": runs, "run_errors": errors, "generated": generated}
    )
