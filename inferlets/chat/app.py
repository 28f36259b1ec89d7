"""One chat turn: `[user message, max_tokens]` -> the assistant's reply (greedy, on the
host fast path). The inferlet side of `benchmarks/serving.py`.

    loom run inferlets/chat/app.py -- "Tell me a story" 32
"""

import inferlet


async def main(args: list[str]) -> str | None:
    message = args[0] if args else "Hello!"
    max_tokens = int(args[1]) if len(args) > 1 else 32
    ctx = inferlet.get_model().create_context()
    ctx.fill_chat([{"role": "user", "content": message}])
    text = await ctx.generate(max_tokens=max_tokens, stop=inferlet.IgnoreEos())
    ctx.release()
    return text
