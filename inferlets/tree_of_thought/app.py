"""Tree of thought: a breadth-first search over partial solutions. Each level, every
kept node proposes ``breadth`` next thoughts at once (forks of the node, sampled
together: one engine pass per token for all of them); each thought is scored by the
model's mean log-probability of it, and the best ``keep`` go on. Every thought is a fork
of its parent, so the problem and the path so far are computed once, not per branch.

    loom run inferlets/tree_of_thought -- "Plan a day at the old mill."

Arguments: ``problem`` or one JSON object ``{"problem", "depth", "breadth", "keep",
"tokens", "share"}`` (``share: false``: every branch a separate prompt, recomputed:
the naive baseline). The reply is JSON: ``{"best": [thought, ...], "score", "levels": [[score,
...], ...], "contexts", "generated"}``.
"""

import json

import inferlet
from inferlet.sharing import branch


def _config(args: list[str]) -> dict:
    cfg = {"problem": "Plan a day at the old mill.", "depth": 3, "breadth": 3, "keep": 2,
           "tokens": 16, "share": True}  # fmt: skip
    if args and args[0].startswith("{"):
        cfg.update(json.loads(args[0]))
    elif args:
        cfg["problem"] = " ".join(args)
    return cfg


async def main(args: list[str]) -> str | None:
    cfg = _config(args)
    depth, breadth, keep, tokens = (int(cfg[k]) for k in ("depth", "breadth", "keep", "tokens"))
    root = inferlet.get_model().create_context()
    root.fill(f"Problem: {cfg['problem']}\nLet us think step by step.\n")
    share = bool(cfg["share"])
    if share:
        root.flush()  # written once; every branch below shares its full pages
    frontier = [(root, [], 0.0)]  # (context, thoughts so far, score)
    levels, contexts, generated = [], 1, 0
    for level in range(depth):
        children = []
        for node, path, _ in frontier:
            for b in range(breadth):
                child = branch(node, share)
                child.fill(f"Step {level + 1}:")
                children.append((child, path, b))
        contexts += len(children)
        done = await inferlet.gather(*(
            c.complete(tokens, inferlet.Temperature(0.9, seed=level * 997 + i),
                       inferlet.IgnoreEos(), logprobs=True)
            for i, (c, _, _) in enumerate(children)
        ))  # fmt: skip
        scored = []
        for (child, path, _), r in zip(children, done, strict=True):
            generated += len(r.tokens)
            score = sum(r.logprobs) / max(1, len(r.logprobs))
            scored.append((child, [*path, r.text], score))
        scored.sort(key=lambda s: -s[2])
        levels.append([s for _, _, s in scored])
        for child, _, _ in scored[keep:]:
            child.release()
        for node, _, _ in frontier:
            node.release()
        frontier = scored[:keep]
    best = frontier[0]
    for node, _, _ in frontier:
        node.release()
    return json.dumps({"best": best[1], "score": best[2], "levels": levels,
                       "contexts": contexts, "generated": generated})  # fmt: skip
