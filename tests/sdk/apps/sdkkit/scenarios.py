"""Scenarios of the SDK test inferlet (a helper module: apps can span files)."""

import json

import inferlet


async def steps(args):
    """Greedy completion, one decode_step per token: the token ids."""
    ctx = inferlet.get_model().create_context()
    ctx.fill(args[0])
    out = [await ctx.decode_step() for _ in range(int(args[1]))]
    ctx.release()
    return json.dumps(out)


async def fast(args):
    """Greedy completion on the host fast path: tokens and text."""
    ctx = inferlet.get_model().create_context()
    ctx.fill(args[0])
    text = await ctx.generate(max_tokens=int(args[1]), stop=inferlet.IgnoreEos())
    return json.dumps({"tokens": ctx.tokens, "text": text, "pending": ctx.pending})


async def forks(args):
    """Eight forks of one prompt, decoded together for a few steps."""
    n, steps_ = int(args[1]), int(args[2])
    ctx = inferlet.get_model().create_context()
    ctx.fill(args[0])
    ctx.flush()
    children = [ctx.fork() for _ in range(n)]
    for i, c in enumerate(children):
        c.fill_tokens([10 + i])
    for _ in range(steps_):
        await inferlet.gather(*(c.decode_step() for c in children))
    out = [c.tokens[len(ctx.tokens) :] for c in children]
    for c in children:
        c.release()
    ctx.release()
    return json.dumps(out)


async def echo(args):
    inferlet.send("ready")
    msg = await inferlet.receive()
    return "echo:" + msg


async def fail(args):
    raise ValueError("boom from the app")


SCENARIOS = {"steps": steps, "fast": fast, "forks": forks, "echo": echo, "fail": fail}
