"""Text completion: `[prompt, max_tokens, mode, eos]`, mode `fast` (the host generates
the whole completion in one call) or `steps` (one `decode_step` per token, the loop in
Python); eos `stop` (the default: end at the model's end-of-sequence token) or `ignore`
(always `max_tokens` tokens, as benchmarks want).

    loom run inferlets/text_completion -- "Once upon a time" 32
"""

import inferlet


async def main(args: list[str]) -> str | None:
    prompt = args[0] if args else "Once upon a time"
    max_tokens = int(args[1]) if len(args) > 1 else 32
    mode = args[2] if len(args) > 2 and args[2] else "fast"
    ignore_eos = len(args) > 3 and args[3] == "ignore"
    if mode not in ("fast", "steps"):
        raise ValueError(f"mode must be fast or steps, not {mode!r}")
    model = inferlet.get_model()
    ctx = model.create_context()
    ctx.fill(prompt)
    if mode == "fast":
        stop = inferlet.IgnoreEos() if ignore_eos else None
        text = await ctx.generate(max_tokens=max_tokens, stop=stop)
    else:
        start = len(ctx.tokens)
        eos = set() if ignore_eos else set(model.eos_tokens)
        for _ in range(max_tokens):
            if await ctx.decode_step() in eos:
                ctx.tokens.pop()  # (the end-of-sequence token is not part of the text)
                break
        text = model.tokenizer.decode(ctx.tokens[start:])
    ctx.release()
    return text
