"""Graph of thought: thoughts that are generated apart and then merged. ``n`` thoughts
are drafted at once (forks of the problem's context), then merged pairwise, level by
level, until one remains: each merge is a fork of the problem's context that reads two
thoughts and writes their synthesis, and the merges of a level run together. A final
refinement improves the last thought. The problem is computed once; every node of the
graph shares its pages.

    loom run inferlets/graph_of_thought -- "Ideas to restore the old mill."

Arguments: ``problem`` or one JSON object ``{"problem", "thoughts", "tokens",
"share"}`` (``share: false``: separate prompts, the naive baseline). The reply is JSON:
``{"answer", "levels": [count, ...], "contexts", "generated"}``.
"""

import json

import inferlet
from inferlet.sharing import branch


def _config(args: list[str]) -> dict:
    cfg = {"problem": "Ideas to restore the old mill.", "thoughts": 4, "tokens": 16, "share": True}
    if args and args[0].startswith("{"):
        cfg.update(json.loads(args[0]))
    elif args:
        cfg["problem"] = " ".join(args)
    return cfg


async def main(args: list[str]) -> str | None:
    cfg = _config(args)
    n, tokens = int(cfg["thoughts"]), int(cfg["tokens"])
    if n < 1:
        raise ValueError("thoughts must be >= 1")
    root = inferlet.get_model().create_context()
    root.fill(f"Problem: {cfg['problem']}\n")
    share = bool(cfg["share"])  # false: each node a separate prompt (the naive baseline)
    if share:
        root.flush()  # once; every node below forks it

    async def node(prompt: str, seed: int) -> str:
        ctx = branch(root, share)
        ctx.fill(prompt)
        text = await ctx.generate(tokens, inferlet.Temperature(0.9, seed=seed),
                                  inferlet.IgnoreEos())  # fmt: skip
        ctx.release()
        return text

    level = await inferlet.gather(*(node(f"Idea {i + 1}:", i) for i in range(n)))
    levels, contexts = [len(level)], len(level)
    while len(level) > 1:
        pairs = [level[i : i + 2] for i in range(0, len(level), 2)]
        level = await inferlet.gather(*(
            node(f"Idea A:{p[0]}\nIdea B:{p[-1]}\nBoth combined:", 1000 + len(levels) * 97 + i)
            for i, p in enumerate(pairs)
        ))  # fmt: skip
        levels.append(len(level))
        contexts += len(level)
    answer = await node(f"Draft:{level[0]}\nImproved:", 7)
    root.release()
    generated = tokens * (sum(levels) + 1)
    return json.dumps({"answer": answer, "levels": levels, "contexts": contexts + 2,
                       "generated": generated})  # fmt: skip
