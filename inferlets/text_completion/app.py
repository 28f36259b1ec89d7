"""Text completion: `[prompt, max_tokens, mode]`, mode `fast` (the host generates the whole
completion in one call) or `steps` (one `decode_step` per token, the loop in Python).

    loom build inferlets/text_completion
"""

import inferlet


async def main(args: list[str]) -> str | None:
    prompt = args[0] if args else "Once upon a time"
    max_tokens = int(args[1]) if len(args) > 1 else 32
    mode = args[2] if len(args) > 2 else "fast"
    ctx = inferlet.get_model().create_context()
    ctx.fill(prompt)
    if mode == "fast":
        text = await ctx.generate(max_tokens=max_tokens, stop=inferlet.IgnoreEos())
    else:
        start = len(ctx.tokens)
        for _ in range(max_tokens):
            await ctx.decode_step()
        text = ctx.model.tokenizer.decode(ctx.tokens[start:])
    ctx.release()
    return text
