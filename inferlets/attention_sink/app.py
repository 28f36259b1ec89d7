"""Attention sink: the first tokens (the sink) plus a sliding window of the latest ones;
the pages in between are let go of, so the KV stays bounded over any length.

    loom run inferlets/attention_sink -- "Once upon a time" 2000

Arguments: ``prompt [steps] [sink] [window] [mode] [every]``: ``sink`` tokens kept from
the start (4), a ``window`` of the latest tokens (64), ``mode`` ``drop`` (pages freed) or
``mask`` (the same attention mask over the whole KV: the reference), and every ``every``
steps the top-8 next-token distribution is recorded. The reply is JSON:
``{"tokens", "most_pages", "dropped", "dists"}``.
"""

import json

import inferlet
from inferlet.window import SlidingWindow


async def main(args: list[str]) -> str | None:
    prompt = args[0] if args else "Once upon a time"
    steps = int(args[1]) if len(args) > 1 else 256
    sink = int(args[2]) if len(args) > 2 else 4
    window = int(args[3]) if len(args) > 3 else 64
    mode = args[4] if len(args) > 4 else "drop"
    every = int(args[5]) if len(args) > 5 else 0
    policy = SlidingWindow(sink, window, drop=mode == "drop")
    ctx = inferlet.get_model().create_context()
    ctx.fill(prompt)
    most, dists = 0, []
    for step in range(steps):
        if every and step % every == every - 1:
            dist = await ctx.next_distribution(8)  # (writes the pending token)
            dists.append([[t for t, _ in dist], [p for _, p in dist]])
            ctx.fill_tokens([dist[0][0]])  # greedy, as decode_step
        else:
            await ctx.decode_step()
        policy.apply(ctx)
        most = max(most, len(ctx.pages))
    out = {"tokens": len(ctx.tokens), "most_pages": most, "dropped": policy.dropped,
           "dists": dists}  # fmt: skip
    ctx.release()
    return json.dumps(out)
