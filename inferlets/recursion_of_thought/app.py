"""Recursion of thought: a problem is split into sub-problems, solved recursively, and
the sub-answers are combined. Every sub-problem is a fork of its parent's context (the
problem statement and the split so far are shared, not recomputed), and siblings are
solved concurrently: their passes ride the same engine batches.

    loom run inferlets/recursion_of_thought -- "Estimate the mill's yearly flour."

Arguments: ``problem`` or one JSON object ``{"problem", "depth", "fanout", "tokens", "share"}``.
The reply is JSON: ``{"answer", "calls", "contexts", "generated"}``; ``calls`` counts the
sub-problems solved at each depth.
"""

import json

import inferlet
from inferlet.sharing import branch


def _config(args: list[str]) -> dict:
    cfg = {"problem": "Estimate the mill's yearly flour.", "depth": 2, "fanout": 2,
           "tokens": 12, "share": True}  # fmt: skip
    if args and args[0].startswith("{"):
        cfg.update(json.loads(args[0]))
    elif args:
        cfg["problem"] = " ".join(args)
    return cfg


class Solver:
    def __init__(self, fanout: int, tokens: int, share: bool = True) -> None:
        self.fanout, self.tokens = fanout, tokens
        self.share = share  # false: each part a separate prompt (the naive baseline)
        self.calls: dict[int, int] = {}
        self.contexts = 0
        self.generated = 0

    async def _gen(self, ctx: inferlet.Context) -> str:
        text = await ctx.generate(self.tokens, stop=inferlet.IgnoreEos())
        self.generated += self.tokens
        return text

    async def solve(self, ctx: inferlet.Context, depth: int, level: int = 0) -> str:
        """The answer to the problem ``ctx`` ends with; ``ctx`` is released."""
        self.calls[level] = self.calls.get(level, 0) + 1
        if depth == 0:
            ctx.fill("\nAnswer:")
            answer = await self._gen(ctx)
            ctx.release()
            return answer
        ctx.fill("\nSplit into parts:")
        await self._gen(ctx)
        ctx.flush()  # the split, written once for every part
        subs = []
        for i in range(self.fanout):
            sub = branch(ctx, self.share)
            sub.fill(f"\nPart {i + 1}:")
            subs.append(sub)
        self.contexts += len(subs)
        answers = await inferlet.gather(*(self.solve(s, depth - 1, level + 1) for s in subs))
        for i, a in enumerate(answers):
            ctx.fill(f"\nAnswer to part {i + 1}:{a}")
        ctx.fill("\nCombined answer:")
        answer = await self._gen(ctx)
        ctx.release()
        return answer


async def main(args: list[str]) -> str | None:
    cfg = _config(args)
    solver = Solver(int(cfg["fanout"]), int(cfg["tokens"]), bool(cfg["share"]))
    ctx = inferlet.get_model().create_context()
    ctx.fill(f"Problem: {cfg['problem']}")
    solver.contexts = 1
    answer = await solver.solve(ctx, int(cfg["depth"]))
    calls = [solver.calls[k] for k in sorted(solver.calls)]
    return json.dumps({"answer": answer, "calls": calls, "contexts": solver.contexts,
                       "generated": solver.generated})  # fmt: skip
