"""Swarm: a planner, workers and a critic that hand work to each other through the
server's messaging: tasks go out on a push/pull channel, results come back on another,
reviews come back on a third and are also broadcast on a topic for any observer. Each
role has a context of its own, forked from one shared system prompt, and all run on the
same engine: their passes batch together.

    loom run inferlets/agent_swarm -- --workers 3 "Describe the old mill"

Simple use: ``[--workers K] [--tokens T] [--tools URL] goal``. Tests and benchmarks pass
one JSON argument:

    {"system": str, "goal": str, "workers": int, "tokens": int, "tools": URL | null,
     "share_prefix": str | null, "swarm": str | null, "roles": "all" | "planner" |
     "worker" | "critic"}

``roles`` "all" runs every role in this instance (tasks of one loop); one role name runs
only that role, so a swarm can also span instances that share a ``swarm`` id. With
``tools``, each worker searches for its task first. The reply is JSON: ``{"events":
[[role, what, task], ...] in the order this instance saw them, "final": str}``.
"""

import json

import inferlet
from inferlet.sharing import prefix_context

SYSTEM = (
    "You are one member of a team. The planner splits the goal into tasks, each worker "
    "does one task, the critic reviews every result, and the planner writes the summary.\n"
)


def _config(args: list[str]) -> dict:
    if args and args[0].startswith("{"):
        return json.loads(args[0])
    cfg = {"system": SYSTEM, "workers": 3, "tokens": 16, "tools": None,
           "share_prefix": "swarm-system", "swarm": None, "roles": "all"}  # fmt: skip
    rest, i = [], 0
    while i < len(args):
        if args[i] in ("--workers", "--tokens", "--tools") and i + 1 < len(args):
            key = args[i][2:]
            cfg[key] = args[i + 1] if key == "tools" else int(args[i + 1])
            i += 2
        else:
            rest.append(args[i])
            i += 1
    cfg["goal"] = " ".join(rest) or "Describe the old mill by the river."
    return cfg


class Swarm:
    def __init__(self, cfg: dict, base: inferlet.Context) -> None:
        self.cfg = cfg
        self.base = base
        self.k = int(cfg["workers"])
        self.tokens = int(cfg["tokens"])
        sid = cfg.get("swarm") or inferlet.instance_id()
        self.tasks, self.results = f"swarm/{sid}/tasks", f"swarm/{sid}/results"
        self.reviews, self.reviews_topic = f"swarm/{sid}/reviewed", f"swarm/{sid}/reviews"
        self.events: list[list] = []
        self.final = ""

    async def _say(self, ctx: inferlet.Context, prompt: str) -> str:
        ctx.fill(prompt)
        return await ctx.generate(max_tokens=self.tokens, stop=inferlet.IgnoreEos())

    async def planner(self) -> None:
        ctx = self.base.fork()
        plan = await self._say(ctx, f"Role: planner.\nGoal: {self.cfg['goal']}\nPlan:")
        self.events.append(["planner", "plan", None])
        for t in range(self.k):
            inferlet.push(self.tasks, json.dumps({"task": t, "text": f"part {t}: {plan[:60]}"}))
            self.events.append(["planner", "task", t])
        seen = []
        while len(seen) < self.k:
            review = json.loads(await inferlet.pull(self.reviews))
            seen.append(review)
            self.events.append(["planner", "review", review["task"]])
            ctx.fill(f"\nReview of task {review['task']}: {review['text']}")
        self.final = await self._say(ctx, "\nSummary:")
        self.events.append(["planner", "final", None])
        ctx.release()

    async def worker(self, w: int) -> None:
        ctx = self.base.fork()
        task = json.loads(await inferlet.pull(self.tasks))
        self.events.append([f"worker{w}", "task", task["task"]])
        ctx.fill(f"Role: worker {w}.\nTask: {task['text']}\n")
        tools = self.cfg.get("tools")
        if tools:
            try:
                resp = await inferlet.http_get(f"{tools}/search?q=mill+{task['task']}")
                found = " ".join(resp.text.split())[:300]
            except RuntimeError as e:
                found = f"error: {e}"
            ctx.fill(f"Search: {found}\n")
        text = await self._say(ctx, "Result:")
        inferlet.push(self.results, json.dumps({"task": task["task"], "worker": w, "text": text}))
        self.events.append([f"worker{w}", "result", task["task"]])
        ctx.release()

    async def critic(self) -> None:
        ctx = self.base.fork()
        ctx.fill("Role: critic.\n")
        for _ in range(self.k):
            result = json.loads(await inferlet.pull(self.results))
            self.events.append(["critic", "result", result["task"]])
            text = await self._say(
                ctx, f"Result of task {result['task']}: {result['text']}\nReview:"
            )
            review = {"task": result["task"], "worker": result["worker"], "text": text}
            inferlet.push(self.reviews, json.dumps(review))
            inferlet.broadcast(self.reviews_topic, json.dumps(review))
            self.events.append(["critic", "review", result["task"]])
        ctx.release()


async def main(args: list[str]) -> str | None:
    cfg = _config(args)
    model = inferlet.get_model()
    base = await prefix_context(model, cfg.get("share_prefix"), cfg["system"])
    base.flush()  # written once here; every role's fork shares its full pages
    swarm = Swarm(cfg, base)
    roles = cfg.get("roles", "all")
    jobs = []
    if roles in ("all", "planner"):
        jobs.append(swarm.planner())
    if roles in ("all", "worker"):
        jobs += [swarm.worker(w) for w in range(swarm.k if roles == "all" else 1)]
    if roles in ("all", "critic"):
        jobs.append(swarm.critic())
    if not jobs:
        raise ValueError(f"unknown roles {roles!r}: all, planner, worker or critic")
    await inferlet.gather(*jobs)
    base.release()
    return json.dumps({"events": swarm.events, "final": swarm.final})
