"""Watermarking: a green list of half the vocabulary, drawn from a secret key, gets a
logit bias at every generated token (the host's generate loop applies it: no guest work
per token), and a z-score test finds the watermark from the tokens alone: unmarked text
holds about half green tokens, marked text many more.

    loom run inferlets/watermarking -- '{"samples": 20}'

One JSON argument: ``{"key": int, "gamma": float, "delta": float, "samples": int,
"tokens": int, "threshold": float, "batch": int, "only": "marked" | "unmarked"}``
generates ``samples`` marked and as many unmarked texts (same prompts and seeds; with
``only``, one kind) and tests each; ``{"detect": [token ids],
"key", "gamma"}`` tests given tokens. The reply is JSON: ``{"marked": [z, ...],
"unmarked": [z, ...], "detection_rate", "false_positive_rate"}`` or ``{"z": float}``.
"""

import json
import math
import random

import inferlet


def green_list(key: int, vocab: int, gamma: float) -> set[int]:
    """The ``gamma`` share of token ids the key marks green."""
    return set(random.Random(key).sample(range(vocab), int(gamma * vocab)))


def z_score(tokens: list[int], green: set[int], gamma: float) -> float:
    """Standard deviations of green tokens above the ``gamma`` share chance gives."""
    n = len(tokens)
    if n == 0:
        return 0.0
    hits = sum(1 for t in tokens if t in green)
    return (hits - gamma * n) / math.sqrt(n * gamma * (1 - gamma))


async def main(args: list[str]) -> str | None:
    cfg = json.loads(args[0]) if args else {}
    key, gamma = int(cfg.get("key", 15485863)), float(cfg.get("gamma", 0.5))
    model = inferlet.get_model()
    green = green_list(key, model.tokenizer.vocab_size, gamma)
    if "detect" in cfg:
        return json.dumps({"z": z_score(list(cfg["detect"]), green, gamma)})
    delta, tokens = float(cfg.get("delta", 2.0)), int(cfg.get("tokens", 48))
    n, batch = int(cfg.get("samples", 20)), int(cfg.get("batch", 32))
    threshold = float(cfg.get("threshold", 4.0))
    kinds = {"marked": (True,), "unmarked": (False,)}.get(cfg.get("only", ""), (True, False))
    bias = {t: delta for t in green}
    topics = ["the mill", "the river", "a journey", "the harvest", "an old map"]

    async def sample(i: int, marked: bool) -> float:
        ctx = model.create_context()
        ctx.fill(f"Story {i} about {topics[i % len(topics)]}:")
        r = await ctx.complete(tokens, inferlet.Temperature(1.0, seed=i), inferlet.IgnoreEos(),
                               bias=bias if marked else None)  # fmt: skip
        ctx.release()
        return z_score(r.tokens, green, gamma)

    out: dict[str, list[float]] = {"marked": [], "unmarked": []}
    for start in range(0, n, batch):
        ids = range(start, min(n, start + batch))
        zs = await inferlet.gather(*(sample(i, m) for m in kinds for i in ids))
        for j, marked in enumerate(kinds):
            out["marked" if marked else "unmarked"] += zs[j * len(ids) : (j + 1) * len(ids)]
    return json.dumps({
        **out,
        "detection_rate": sum(z > threshold for z in out["marked"]) / max(1, n),
        "false_positive_rate": sum(z > threshold for z in out["unmarked"]) / max(1, n),
    })  # fmt: skip
