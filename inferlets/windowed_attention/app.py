"""Windowed attention: each token attends only to the latest ``window`` tokens; older
pages are let go of, so the KV stays bounded (an attention sink without the sink).

    loom run inferlets/windowed_attention -- "Once upon a time" 2000 128

Arguments: ``prompt [steps] [window] [mode]`` (``mode`` ``drop``, or ``mask``: the same
attention mask over the whole KV). The reply is JSON: ``{"text", "most_pages",
"dropped"}``.
"""

import json

import inferlet
from inferlet.window import SlidingWindow


async def main(args: list[str]) -> str | None:
    prompt = args[0] if args else "Once upon a time"
    steps = int(args[1]) if len(args) > 1 else 256
    window = int(args[2]) if len(args) > 2 else 128
    mode = args[3] if len(args) > 3 else "drop"
    policy = SlidingWindow(0, window, drop=mode == "drop")
    model = inferlet.get_model()
    ctx = model.create_context()
    ctx.fill(prompt)
    start, most = len(ctx.tokens), 0
    for _ in range(steps):
        await ctx.decode_step()
        policy.apply(ctx)
        most = max(most, len(ctx.pages))
    text = model.tokenizer.decode(ctx.tokens[start:])
    ctx.release()
    return json.dumps({"text": text, "most_pages": most, "dropped": policy.dropped})
