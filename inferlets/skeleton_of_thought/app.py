"""Skeleton of thought: the model first writes a short skeleton (the points of the
answer), then expands every point at once: one fork per point of the context holding the
question and the skeleton, decoded together (one engine pass per token for all points);
the expansions are joined in order.

    loom run inferlets/skeleton_of_thought -- "Describe the old mill."

Arguments: ``question`` or one JSON object ``{"question", "points", "skeleton_tokens",
"tokens", "share"}`` (``share: false``: separate prompts, the naive baseline). The reply
is JSON: ``{"skeleton", "points": [text, ...], "answer",
"contexts", "generated"}``.
"""

import json

import inferlet
from inferlet.sharing import branch


def _config(args: list[str]) -> dict:
    cfg = {"question": "Describe the old mill.", "points": 4, "skeleton_tokens": 24,
           "tokens": 24, "share": True}  # fmt: skip
    if args and args[0].startswith("{"):
        cfg.update(json.loads(args[0]))
    elif args:
        cfg["question"] = " ".join(args)
    return cfg


async def main(args: list[str]) -> str | None:
    cfg = _config(args)
    n, tokens = int(cfg["points"]), int(cfg["tokens"])
    ctx = inferlet.get_model().create_context()
    ctx.fill(f"Question: {cfg['question']}\nFirst, a skeleton of {n} short points.\nSkeleton:")
    skeleton = await ctx.generate(int(cfg["skeleton_tokens"]), stop=inferlet.IgnoreEos())
    ctx.fill("\nNow each point in full.\n")
    share = bool(cfg["share"])  # false: each point a separate prompt (the naive baseline)
    if share:
        ctx.flush()
    # Every point's expansion shares the question and the skeleton (the forks' pages).
    forks = []
    for i in range(n):
        f = branch(ctx, share)
        f.fill(f"Point {i + 1}:")
        forks.append(f)
    points = await inferlet.gather(*(
        f.generate(tokens, stop=inferlet.IgnoreEos()) for f in forks
    ))  # fmt: skip
    for f in [*forks, ctx]:
        f.release()
    answer = "\n".join(f"{i + 1}.{p}" for i, p in enumerate(points))
    return json.dumps({"skeleton": skeleton, "points": points, "answer": answer,
                       "contexts": n + 1,
                       "generated": int(cfg["skeleton_tokens"]) + n * tokens})  # fmt: skip
