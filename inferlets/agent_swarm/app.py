"""Swarm: a planner, workers and a critic that hand work to each other through the
server's messaging: tasks go out on a push/pull channel, results come back on another,
reviews are broadcast on a topic. Each role has a context of its own, forked from one
shared system prompt, and all run on the same engine: their passes batch together.

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
        self.reviews_topic = f"swarm/{sid}/reviews"
        self.events: list[list] = []
        self.final = ""

    async def _say(self, ctx: inferlet.Context, prompt: str) -> str:
        ctx.fill(prompt)
        inferlet.log("DBG say start", prompt[:20], level="warning")
        r = await ctx.generate(max_tokens=self.tokens, stop=inferlet.IgnoreEos())
        inferlet.log("DBG say done", prompt[:20], level="warning")
        return r

    async def planner(self, reviews: object) -> None:
        ctx = self.base.fork()
        plan = await self._say(ctx, f"Role: planner.\nGoal: {self.cfg['goal']}\nPlan:")
        self.events.append(["planner", "plan", None])
        for t in range(self.k):
            inferlet.push(self.tasks, json.dumps({"task": t, "text": f"part {t}: {plan[:60]}"}))
            self.events.append(["planner", "task", t])
        seen = []
        while len(seen) < self.k:
            inferlet.log("DBG planner waits", len(seen), level="warning")
            review = json.loads(await reviews.__anext__())
            inferlet.log("DBG planner got", review["task"], level="warning")
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
            inferlet.log("DBG broadcast", result["task"], level="warning")
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
    # Subscribed before any task goes out, so no review can be missed.
    reviews = inferlet.subscribe(swarm.reviews_topic) if roles in ("all", "planner") else None
    jobs = []
    if roles in ("all", "planner"):
        jobs.append(swarm.planner(reviews))
    if roles in ("all", "worker"):
        jobs += [swarm.worker(w) for w in range(swarm.k if roles == "all" else 1)]
    if roles in ("all", "critic"):
        jobs.append(swarm.critic())
    if not jobs:
        raise ValueError(f"unknown roles {roles!r}: all, planner, worker or critic")
    await inferlet.gather(*jobs)
    if reviews is not None:
        reviews.close()
    base.release()
    return json.dumps({"events": swarm.events, "final": swarm.final})
