"""One chat turn: `[user message, max_tokens, eos]` -> the assistant's reply (greedy, on
the host fast path), ending at the model's end-of-sequence token unless eos is `ignore`
(always `max_tokens` tokens: the inferlet side of `benchmarks/serving.py`).

    loom run inferlets/chat/app.py -- "Tell me a story" 32
"""

import inferlet


async def main(args: list[str]) -> str | None:
    message = args[0] if args else "Hello!"
    max_tokens = int(args[1]) if len(args) > 1 else 32
    ignore_eos = len(args) > 2 and args[2] == "ignore"
    ctx = inferlet.get_model().create_context()
    ctx.fill_chat([{"role": "user", "content": message}])
    stop = inferlet.IgnoreEos() if ignore_eos else None
    text = await ctx.generate(max_tokens=max_tokens, stop=stop)
    ctx.release()
    return text
