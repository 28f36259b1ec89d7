"""Beam search: the continuations of best total log-probability. Every beam's next-token
distribution comes from one engine pass per step (the beams are forks decoded together);
kept beams are forks of their parent, sharing its full KV pages.

    loom run inferlets/beam_search -- "The old mill" 4 16

Arguments: ``prompt [beam_size] [max_tokens] [allowed]``; ``allowed`` is a JSON list of
token ids the beams may take (a restricted vocabulary). The reply is JSON: ``{"beams":
[{"text", "tokens", "logprob"}, ...]}``, best first.
"""

import json

import inferlet


async def main(args: list[str]) -> str | None:
    prompt = args[0] if args else "The old mill"
    beam_size = int(args[1]) if len(args) > 1 else 4
    max_tokens = int(args[2]) if len(args) > 2 else 16
    allowed = json.loads(args[3]) if len(args) > 3 else None
    if not 1 <= beam_size <= 64:
        raise ValueError("beam_size must be in [1, 64]")
    model = inferlet.get_model()
    ctx = model.create_context()
    ctx.fill(prompt)
    beams = await ctx.beam_search(beam_size, max_tokens, allowed=allowed)
    ctx.release()
    decode = model.tokenizer.decode
    return json.dumps({
        "beams": [{"text": decode(t), "tokens": t, "logprob": lp} for t, lp in beams]
    })  # fmt: skip
