"""Best-of-n (parallel generation): n samples of one prompt, decoded together (one
engine pass per step for all of them), the one of highest mean log-probability kept.

    loom run inferlets/best_of_n -- "Once upon a time" 4 32

Arguments: ``prompt [n] [max_tokens] [temperature] [all] [separate]``; with ``all`` every
sample is returned, best first; with ``separate`` each sample is a separate prompt (the
naive baseline: nothing shared). The prompt is computed once: the samples are forks sharing its
full pages. The reply is JSON: ``{"best": text, "samples": [{"text", "mean_logprob",
"tokens"}, ...]}``.
"""

import json

import inferlet
from inferlet.sharing import branch


async def main(args: list[str]) -> str | None:
    prompt = args[0] if args else "Once upon a time"
    n = int(args[1]) if len(args) > 1 else 4
    max_tokens = int(args[2]) if len(args) > 2 else 32
    temperature = float(args[3]) if len(args) > 3 else 0.8
    keep_all, share = "all" in args[4:], "separate" not in args[4:]
    if not 1 <= n <= 64:
        raise ValueError("n must be in [1, 64]")
    ctx = inferlet.get_model().create_context()
    ctx.fill(prompt)
    if share:
        ctx.flush()
    forks = [branch(ctx, share) for _ in range(n)]
    results = await inferlet.gather(*(
        f.complete(max_tokens, inferlet.Temperature(temperature, seed=i), logprobs=True)
        for i, f in enumerate(forks)
    ))  # fmt: skip
    samples = [
        {"text": r.text, "tokens": r.tokens,
         "mean_logprob": sum(r.logprobs) / max(1, len(r.logprobs))}
        for r in results
    ]  # fmt: skip
    samples.sort(key=lambda s: -s["mean_logprob"])
    for f in forks:
        f.release()
    ctx.release()
    return json.dumps({"best": samples[0]["text"], "samples": samples if keep_all else samples[:1]})
