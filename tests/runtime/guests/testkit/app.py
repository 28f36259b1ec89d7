"""A test inferlet on the raw API bindings; the first argument picks a scenario."""

import json

import wit_world
from componentize_py_types import Err
from wit_world.imports import forward, generate, http, kv, messaging, model, runtime, store, types

GREEDY = types.Sampler(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=None)


def wait(fut):
    types.poll([fut.pollable()])
    return fut.get()


def unwrap(value):
    if hasattr(value, "value") and type(value).__name__ == "Err":
        raise Err(value.value)
    return value.value if type(value).__name__ == "Ok" else value


def fwd(q, tokens, positions, pages, last, sample=None, dist=0):
    fp = forward.ForwardPass(q)
    fp.input(tokens, positions)
    fp.kv_pages(pages, last)
    if sample is not None:
        fp.output_token(len(tokens) - 1, sample)
    if dist:
        fp.output_distribution(len(tokens) - 1, dist)
    return fp.execute()


def greedy_decode(q, ps, prompt, steps, fused=""):
    """Prefill `prompt`, then `steps` single-token forwards; returns the sampled tokens.
    `fused`: each pass through `forward.step` ("step") or `forward.step-wait` ("wait")
    instead of a built forward-pass."""
    pages = kv.allocate(q, (len(prompt) + steps + ps - 1) // ps)
    n = len(prompt)
    tokens, positions = prompt, list(range(n))
    toks = []
    for _ in range(steps):
        args = (q, tokens, positions, pages[: (n - 1) // ps + 1], (n - 1) % ps + 1, GREEDY)
        if fused == "wait":
            toks.append(forward.step_wait(*args))
        else:
            toks.append(unwrap(wait(forward.step(*args) if fused else fwd(*args))).tokens[0])
        tokens, positions = [toks[-1]], [n]
        n += 1
    return toks


class WitWorld(wit_world.WitWorld):
    def run(self) -> None:
        args = runtime.arguments()
        mode = args[0] if args else "hello"
        m = model.default_model()
        q = m.create_queue()
        ps = kv.page_size(q)
        if mode == "hello":
            messaging.send("hello from " + runtime.instance_id())
        elif mode == "echo":
            msg = wait(messaging.receive())
            messaging.send("echo:" + msg)
        elif mode in ("decode", "step-decode", "wait-decode"):
            prompt = [int(x) for x in args[1].split(",")]
            steps = int(args[2])
            fused = {"step-decode": "step", "wait-decode": "wait"}.get(mode, "")
            messaging.send(json.dumps(greedy_decode(q, ps, prompt, steps, fused)))
        elif mode == "chain-decode":
            # Pipelined decode through `step-chain`, then `step-settle` of the last pass
            # ahead: {"tokens": the `steps` tokens, "settled": its token or null}.
            prompt = [int(x) for x in args[1].split(",")]
            steps = int(args[2])
            n = len(prompt)
            pages = kv.allocate(q, (n + steps + ps - 1) // ps)  # the last pass ahead too
            first = pages[: (n - 1) // ps + 1], (n - 1) % ps + 1
            ahead = pages[: n // ps + 1], n % ps + 1
            toks = [forward.step_chain(q, prompt, list(range(n)), *first, GREEDY, *ahead)]
            for _ in range(steps - 1):
                n += 1
                ahead = pages[: n // ps + 1], n % ps + 1
                toks.append(forward.step_chain(q, [], [], [], 0, GREEDY, *ahead))
            settled = forward.step_settle(q)
            messaging.send(json.dumps({"tokens": toks, "settled": settled}))
        elif mode == "chain-nothing-ahead":
            forward.step_chain(q, [], [], [], 0, GREEDY, kv.allocate(q, 1), 1)
        elif mode == "complete":
            # Text completion, one forward call per token: args = prompt text, max tokens.
            toks = greedy_decode(q, ps, list(m.encode(args[1])), int(args[2]))
            messaging.send(m.decode(toks))
        elif mode == "http":
            # POST to args[1]; report "status body".
            fut = http.fetch("POST", args[1], [("x-test", "1")], b"ping")
            r = unwrap(wait(fut))
            messaging.send(f"{r.status} {bytes(r.body).decode()}")
        elif mode == "put":
            store.set(args[1], args[2])
        elif mode == "spawn":
            # A child of the same program (args[1]) that stores args[2] = args[3], after
            # this one has ended (detached: it outlives its parent).
            messaging.send(unwrap(runtime.launch_detached(args[1], ["put", args[2], args[3]])))
        elif mode == "fork":
            ctx = [int(x) for x in args[1].split(",")]
            assert len(ctx) % ps == 0
            shared = kv.allocate(q, len(ctx) // ps)
            unwrap(wait(fwd(q, ctx, list(range(len(ctx))), shared, ps)))
            n = len(ctx)
            tok = 7
            own = kv.allocate(q, 1)
            parent = unwrap(wait(fwd(q, [tok], [n], shared + own, 1, dist=20)))
            futures = []
            for i in range(4):
                fq = m.create_queue()
                page = kv.allocate(fq, 1)
                futures.append(fwd(fq, [tok + i], [n], shared + page, 1, dist=20))
            types.poll([f.pollable() for f in futures])
            results = []
            for f in futures:
                while f.get() is None:
                    types.poll([f.pollable()])
                results.append(unwrap(f.get()))
            messaging.send(
                json.dumps(
                    {
                        "parent": [parent.dist_ids, parent.dist_probs],
                        "forks": [[r.dist_ids, r.dist_probs] for r in results],
                    }
                )
            )
        elif mode == "generate":
            prompt = m.encode(args[1])
            max_tokens = int(args[2])
            fut = generate.generate(
                q,
                [],
                0,
                prompt,
                0,
                GREEDY,
                generate.StopConditions(
                    max_tokens=max_tokens, stop_tokens=[], stop_strings=[], stop_at_eos=False
                ),
                None,
                len(args) > 3,
                False,
                None,
                None,
            )
            g = unwrap(wait(fut))
            messaging.send(
                json.dumps(
                    {
                        "tokens": g.tokens,
                        "text": g.text,
                        "finish": g.finish_reason,
                        "pages": len(g.pages),
                        "last": g.last_page_len,
                    }
                )
            )
        elif mode in ("fa", "fb", "fc"):
            ctx = list(range(10, 42))
            shared = kv.allocate(q, 2)
            unwrap(wait(fwd(q, ctx, list(range(32)), shared, ps)))
            own = kv.allocate(q, 1)
            if mode == "fa":
                r = unwrap(wait(fwd(q, [7], [32], shared + own, 1, dist=20)))
                messaging.send(json.dumps([r.dist_ids, r.dist_probs]))
            elif mode == "fb":
                fq = m.create_queue()
                page = kv.allocate(fq, 1)
                r = unwrap(wait(fwd(fq, [7], [32], shared + page, 1, GREEDY)))
                messaging.send(json.dumps(r.tokens[0]))
            else:
                f1 = fwd(q, [7], [32], shared + own, 1, GREEDY)
                own2 = kv.allocate(q, 1)
                f2 = fwd(q, [8], [32], shared + own2, 1, GREEDY)
                types.poll([f1.pollable(), f2.pollable()])
                messaging.send("polled")
        elif mode == "spin":
            x = 0
            while True:
                x += 1
        elif mode == "hold-mb":
            held = [bytearray(1 << 20) for _ in range(int(args[1]))]
            messaging.send(f"holding {len(held)}")
            wait(messaging.receive())
        elif mode == "grow":
            hog = []
            while True:
                hog.append(bytearray(1 << 20))
        elif mode == "forge":
            kv.free(q, [12345])
        elif mode == "step-forge":
            wait(forward.step(q, [1], [0], [12345], 1, GREEDY))
        elif mode == "wait-forge":
            forward.step_wait(q, [1], [0], [12345], 1, GREEDY)
        elif mode == "wait-invalid":
            # A pass the engine cannot run (no input tokens) fails as an Err result.
            pages = kv.allocate(q, 1)
            try:
                forward.step_wait(q, [], [], pages, 1, GREEDY)
                messaging.send("ok")
            except Err as e:
                messaging.send("error:" + str(e.value))
        elif mode == "import-unknown":
            res = kv.import_pages(q, "no-such-export")
            messaging.send("error:" + res.value if type(res).__name__ == "Err" else "ok")
        elif mode == "subscribe-flood":
            subs = []  # held: each stays subscribed
            while True:
                subs.append(messaging.subscribe("flood-topic"))
                if len(subs) % 100 == 0:
                    messaging.send(str(len(subs)))
        elif mode == "bomb":
            # Children of itself (args[1]) holding args[2] pages each, launched until one
            # is refused: "<how many> <why>", then it waits.
            n = 0
            try:
                while True:
                    unwrap(runtime.launch(args[1], ["hold", args[2]]))
                    n += 1
            except Err as e:
                messaging.send(f"{n} {e.value}")
            wait(messaging.receive())
        elif mode == "flood":
            while True:
                messaging.send("x" * 100)
        elif mode == "export":
            pages = kv.allocate(q, 2)
            kv.export_pages(q, pages, args[1], args[2] == "persistent")
            wait(q.synchronize())
            store.set("exported", args[1])
            messaging.send("exported")
            if len(args) > 3:
                wait(messaging.receive())
        elif mode == "import":
            res = kv.import_pages(q, args[1])
            pages = unwrap(res)
            messaging.send(json.dumps({"pages": len(pages), "exports": kv.list_exports()}))
        elif mode == "unexport":
            kv.unexport_pages(q, args[1])
            messaging.send("unexported" if wait(q.synchronize()) else "failed")
        elif mode == "hold":
            kv.allocate(q, int(args[1]))
            wait(q.synchronize())
            messaging.send("holding")
            wait(messaging.receive())
        else:
            raise Err("unknown mode " + mode)
