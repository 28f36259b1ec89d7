"""Scenarios of the SDK test inferlet (a helper module: apps can span files)."""

import json

import inferlet


async def steps(args):
    """Greedy completion, one decode_step per token: the token ids."""
    ctx = inferlet.get_model().create_context()
    ctx.fill(args[0])
    out = [await ctx.decode_step() for _ in range(int(args[1]))]
    ctx.release()
    return json.dumps(out)


async def interleaved(args):
    """Decode steps with other uses of the context between them, each of which settles
    the step queued ahead: a fill, a change of sampler (top-1: greedy again), and the
    next step's own sampler switching back; the token ids."""
    ctx = inferlet.get_model().create_context()
    ctx.fill(args[0])
    out = [await ctx.decode_step() for _ in range(3)]
    ctx.fill_tokens([int(args[1])])
    out += [await ctx.decode_step() for _ in range(3)]
    out += [await ctx.decode_step(inferlet.TopK(1)) for _ in range(2)]
    out += [await ctx.decode_step() for _ in range(2)]
    ctx.release()
    return json.dumps(out)


async def fast(args):
    """Greedy completion on the host fast path: tokens and text."""
    ctx = inferlet.get_model().create_context()
    ctx.fill(args[0])
    text = await ctx.generate(max_tokens=int(args[1]), stop=inferlet.IgnoreEos())
    return json.dumps({"tokens": ctx.tokens, "text": text, "pending": ctx.pending})


async def forks(args):
    """Eight forks of one prompt, decoded together for a few steps."""
    n, steps_ = int(args[1]), int(args[2])
    ctx = inferlet.get_model().create_context()
    ctx.fill(args[0])
    ctx.flush()
    children = [ctx.fork() for _ in range(n)]
    for i, c in enumerate(children):
        c.fill_tokens([10 + i])
    for _ in range(steps_):
        await inferlet.gather(*(c.decode_step() for c in children))
    out = [c.tokens[len(ctx.tokens) :] for c in children]
    for c in children:
        c.release()
    ctx.release()
    return json.dumps(out)


async def echo(args):
    inferlet.send("ready")
    msg = await inferlet.receive()
    return "echo:" + msg


async def fail(args):
    raise ValueError("boom from the app")


async def dist(args):
    """The top-k distribution, then the greedy token from a second context."""
    model = inferlet.get_model()
    a = model.create_context()
    a.fill(args[0])
    d = await a.next_distribution(int(args[1]))
    b = model.create_context()
    b.fill(args[0])
    greedy = await b.decode_step()
    a.release()
    b.release()
    return json.dumps({"dist": d, "greedy": greedy})


async def beam(args):
    ctx = inferlet.get_model().create_context()
    ctx.fill(args[0])
    beams = await ctx.beam_search(int(args[1]), int(args[2]), stop=inferlet.IgnoreEos())
    ctx.release()
    return json.dumps(beams)


class ListDrafter:
    """Proposes `k` tokens from a known continuation, wrong at chosen steps."""

    def __init__(self, prompt_len, truth, k, wrong_every):
        self.prompt_len, self.truth, self.k, self.wrong_every = prompt_len, truth, k, wrong_every
        self.calls, self.accepted = 0, 0

    def draft(self, tokens):
        self.calls += 1
        done = len(tokens) - self.prompt_len
        guess = list(self.truth[done : done + self.k])
        if guess and self.wrong_every and self.calls % self.wrong_every == 0:
            guess[len(guess) // 2] = (guess[len(guess) // 2] + 1) % 50
        return guess

    def feedback(self, accepted, proposed):
        self.accepted += accepted


async def spec(args):
    """Speculative decoding with a drafter that knows the answer but errs every 3rd call."""
    truth = json.loads(args[1])
    ctx = inferlet.get_model().create_context()
    ctx.fill(args[0])
    drafter = ListDrafter(len(ctx.tokens), truth, 4, 3)
    first = await ctx.decode_step()
    out = await ctx.generate_speculative(drafter, len(truth) - 1)
    after = await ctx.decode_step()  # the context goes on correctly after speculation
    ctx.release()
    return json.dumps(
        {
            "tokens": [first, *out],
            "after": after,
            "passes": drafter.calls,
            "accepted": drafter.accepted,
        }
    )


class TreeDrafter:
    """Each call proposes a tree: two guesses per level, the true token second, so the
    accepted path is never the first nodes in draft order (its KV is re-fed)."""

    def __init__(self, prompt_len, truth, depth):
        self.prompt_len, self.truth, self.depth = prompt_len, truth, depth
        self.calls, self.accepted = 0, 0

    def draft(self, tokens):
        self.calls += 1
        done = len(tokens) - self.prompt_len
        nodes, parent = [], -1
        for tok in self.truth[done : done + self.depth]:
            nodes.append(((tok + 7) % 50, parent))  # a wrong sibling first
            nodes.append((tok, parent))
            parent = len(nodes) - 1
        return nodes

    def feedback(self, accepted, proposed):
        self.accepted += accepted


async def spec_tree(args):
    truth = json.loads(args[1])
    ctx = inferlet.get_model().create_context()
    ctx.fill(args[0])
    drafter = TreeDrafter(len(ctx.tokens), truth, 3)
    first = await ctx.decode_step()
    out = await ctx.generate_speculative(drafter, len(truth) - 1)
    after = await ctx.decode_step()
    ctx.release()
    return json.dumps(
        {
            "tokens": [first, *out],
            "after": after,
            "passes": drafter.calls,
            "accepted": drafter.accepted,
        }
    )


async def sink(args):
    """Attention sink: 4 sink tokens + a window of pages; the KV stays bounded."""
    ctx = inferlet.get_model().create_context()
    ps = ctx.page_size
    ctx.fill(args[0])
    steps_, window_pages = int(args[1]), 2
    most, head_masked, dropped = 0, False, 0
    for _ in range(steps_):
        await ctx.decode_step()
        if ctx.kv_len >= (window_pages + 2) * ps:  # sink page + window + the page in use
            if not head_masked:
                ctx.mask_tokens(4, ps)  # page 0 keeps only the 4 sink tokens
                head_masked = True
            first = ctx.slot_pos[ps]  # the oldest page after the sink page
            ctx.mask_tokens(first, first + ps)
            dropped += ctx.drop_masked_pages()
        most = max(most, len(ctx.pages))
    ctx.release()
    return json.dumps({"most_pages": most, "tokens": len(ctx.tokens), "dropped": dropped})


async def masked(args):
    """Fill and write a prompt, hide its first tokens, then generate greedily: tokens."""
    ctx = inferlet.get_model().create_context()
    ctx.fill(args[0])
    await ctx.decode_step()  # the prompt is written (a forward pass from position 0)
    ctx.mask_tokens(0, int(args[1]))
    await ctx.generate(max_tokens=int(args[2]), stop=inferlet.IgnoreEos())
    out = ctx.tokens
    ctx.release()
    return json.dumps(out)


async def repend(args):
    """A prompt of ``args[1]`` tokens, flushed (nothing pending), then continued four
    ways: a fork's generate, the context's own generate, a decode step and a
    distribution, each on a context of its own."""
    model = inferlet.get_model()
    ids = model.tokenizer.encode(args[0])[: int(args[1])]
    n = int(args[2])

    def flushed():
        ctx = model.create_context()
        ctx.fill_tokens(ids)
        ctx.flush()
        return ctx

    ctx = flushed()
    child = ctx.fork()
    await child.generate(max_tokens=n, stop=inferlet.IgnoreEos())
    await ctx.generate(max_tokens=n, stop=inferlet.IgnoreEos())
    out = {"ids": ids, "fork": child.tokens[len(ids) :], "self": ctx.tokens[len(ids) :]}
    child.release()
    ctx.release()
    ctx = flushed()
    out["step"] = await ctx.decode_step()
    ctx.release()
    ctx = flushed()
    out["dist"] = (await ctx.next_distribution(4))[0][0]
    ctx.release()
    return json.dumps(out)


async def complete(args):
    """``Context.complete``: logprobs of a greedy generation, then one limited to the
    token ids in ``args[2]`` (comma-separated)."""
    model = inferlet.get_model()
    n, allowed = int(args[1]), [int(x) for x in args[2].split(",")]
    out = {}
    for key, kw in (("free", {}), ("masked", {"allowed": allowed})):
        ctx = model.create_context()
        ctx.fill(args[0])
        c = await ctx.complete(n, stop=inferlet.IgnoreEos(), logprobs=True, **kw)
        out[key] = {"tokens": c.tokens, "logprobs": c.logprobs, "reason": c.finish_reason}
        ctx.release()
    return json.dumps(out)


async def export_ctx(args):
    ctx = inferlet.get_model().create_context()
    ctx.fill(args[0])
    tok = await ctx.decode_step()  # the prompt is written now: export it
    await ctx.export(args[1], persistent=True, public=args[2:] == ["public"])
    inferlet.send(json.dumps(tok))
    ctx.release()
    return None


async def import_ctx(args):
    model = inferlet.get_model()
    ctx = await inferlet.Context.import_(model, args[0])
    tok = await ctx.decode_step()
    ctx.release()
    return json.dumps(tok)


async def pubsub(args):
    if args[0] == "sub":
        topic = inferlet.subscribe("news")
        inferlet.send("subscribed")
        async for msg in topic:
            topic.close()
            return "got " + msg
    inferlet.broadcast("news", args[1])
    return None


async def channel(args):
    if args[0] == "pull":
        return "pulled " + await inferlet.pull("jobs")
    if args[0] == "pull-from":
        return "pulled " + await inferlet.pull(args[1])
    if args[0] == "push-to":
        inferlet.push(args[1], args[2])
        return None
    inferlet.push("jobs", args[1])
    return None


async def misc(args):
    inferlet.store_set("k1", "v1")
    keys = inferlet.store_list()
    got = inferlet.store_get("k1")
    inferlet.store_delete("k1")
    inferlet.log("misc scenario ran", level="info")
    model = inferlet.get_model()
    ctx = model.create_context()
    try:
        ctx.fill_chat([{"role": "user", "content": "hi"}])
        chat = len(ctx.tokens) > 0
    except ValueError:
        chat = None  # the model has no chat template
    return json.dumps(
        {
            "keys": keys,
            "got": got,
            "after": inferlet.store_get("k1"),
            "chat": chat,
            "args": inferlet.get_arguments(),
            "model": model.name,
        }
    )


async def net(args):
    """HTTP through the policy, then a child inferlet of this program."""
    got = await inferlet.http_post(args[0], "ping", {"x-test": "sdk"})
    child = await inferlet.launch(args[1], ["channel", "push", "from-child"], detached=True)
    return json.dumps({"status": got.status, "text": got.text, "child": child})


async def family(args):
    """Launch a child of this program that waits on channel ``args[1]``, report its id,
    then wait for a message from the client before returning (the child ends with us)."""
    child = await inferlet.launch(args[0], ["channel", "pull-from", args[1]])
    inferlet.send(child)
    return "parent done: " + await inferlet.receive()


async def join(args):
    """Children waited on and ended from here: one that ends well, one that fails, one
    ended by this parent; then a wait on an id that is no child of ours."""
    program, out = args[0], {}
    done = await inferlet.launch(program, ["channel", "push", "x"])
    await done.wait()
    out["ok"] = "ok"
    for key, child_args in (("failed", ["fail"]), ("killed", ["channel", "pull-from", "n"])):
        child = await inferlet.launch(program, child_args)
        if key == "killed":
            child.kill()
        try:
            await child.wait()
        except RuntimeError as e:
            out[key] = str(e)
    try:
        await inferlet.Child("not-a-child").wait()
    except RuntimeError as e:
        out["stranger"] = str(e)
    return json.dumps(out)


SCENARIOS = {
    "join": join,
    "net": net,
    "spec_tree": spec_tree,
    "steps": steps,
    "interleaved": interleaved,
    "fast": fast,
    "forks": forks,
    "echo": echo,
    "fail": fail,
    "dist": dist,
    "beam": beam,
    "spec": spec,
    "sink": sink,
    "masked": masked,
    "repend": repend,
    "complete": complete,
    "export": export_ctx,
    "import": import_ctx,
    "pubsub": pubsub,
    "channel": channel,
    "family": family,
    "misc": misc,
}
