"""Constrained decoding: output that parses — JSON that validates against a schema, text
matching a regular expression or a Lark grammar, one of a list of choices — enforced by
the host's grammar engine on every token.

    loom run inferlets/constrained_decoding -- '{"schema": {"type": "object", ...}}'
    loom run inferlets/constrained_decoding -- '{"lark": "start: ...", "mode": "steps"}'

The argument is a JSON object, every key optional:

- the constraint, one of ``"schema"`` (a JSON schema), ``"regex"``, ``"lark"``,
  ``"choice"`` (a list of strings), ``"json_object": true``; default: a small schema of
  a person (nested object, enum, bounded array);
- ``"prompt"``; ``"samples"`` (default 3); ``"max_tokens"`` (256); ``"temperature"``
  (1.0; 0 is greedy); ``"seed"``;
- ``"mode"``: ``"generate"`` (default: one host call per sample, the host masks every
  step) or ``"steps"`` (a ``decode_step`` loop: the context's bound matcher supplies each
  step's mask — the way a custom decoder combines a grammar with its own logic);
- ``"fork_after"``: generate that many tokens under the grammar once, then fork the
  context ``samples`` ways: each fork finishes the same partial output, its grammar
  going on from the same point.

The reply is JSON: ``{"mode", "outputs": [{"text", "finish_reason", "tokens"}], "prefix"}``.
"""

import json
from typing import Any

import inferlet

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}},
            "required": ["city"],
        },
    },
    "required": ["name", "age", "role", "address"],
    "additionalProperties": False,
}


def constraint_of(cfg: dict[str, Any]) -> inferlet.Constraint:
    if "regex" in cfg:
        return inferlet.Regex(cfg["regex"])
    if "lark" in cfg:
        return inferlet.Grammar(cfg["lark"])
    if "choice" in cfg:
        return inferlet.Choice(cfg["choice"])
    if cfg.get("json_object"):
        return inferlet.JsonObject()
    return inferlet.JsonSchema(cfg.get("schema", PERSON))


async def by_steps(ctx: inferlet.Context, sampler: inferlet.Sampler, limit: int) -> dict[str, Any]:
    """A decode loop under the context's bound grammar: one masked pass per token."""
    model = ctx.model
    eos = set(model.eos_tokens)
    tokens: list[int] = []
    reason = "length"
    assert ctx.matcher is not None
    while len(tokens) < limit:
        tok = await ctx.decode_step(sampler)
        tokens.append(tok)
        if tok in eos:
            reason = "stop"
            tokens.pop()
            break
    return {"text": model.tokenizer.decode(tokens), "finish_reason": reason, "tokens": len(tokens)}


async def by_generate(
    ctx: inferlet.Context, sampler: inferlet.Sampler, limit: int
) -> dict[str, Any]:
    done = await ctx.complete(limit, sampler)
    made = [t for t in done.tokens if t not in ctx.model.eos_tokens]  # (as by_steps counts)
    return {"text": done.text, "finish_reason": done.finish_reason, "tokens": len(made)}


async def main(args: list[str]) -> str | None:
    cfg = json.loads(args[0]) if args else {}
    constraint = constraint_of(cfg)
    samples = int(cfg.get("samples", 3))
    limit = int(cfg.get("max_tokens", 256))
    temperature = float(cfg.get("temperature", 1.0))
    seed = cfg.get("seed")
    mode = cfg.get("mode", "generate")
    if mode not in ("generate", "steps"):
        raise ValueError("mode is 'generate' or 'steps'")
    model = inferlet.get_model()
    root = model.create_context()
    root.fill(cfg.get("prompt", "Reply with the record, as JSON:\n"))
    root.constrain(constraint)  # forks (and every generate of theirs) go on with it
    prefix = ""
    fork_after = int(cfg.get("fork_after", 0))
    if fork_after:
        prefix = await root.generate(fork_after, inferlet.Greedy())
    else:
        root.flush()
    run = by_steps if mode == "steps" else by_generate

    def sampler(i: int) -> inferlet.Sampler:
        if temperature <= 0:
            return inferlet.Greedy()
        return inferlet.Temperature(temperature, None if seed is None else int(seed) + i)

    forks = [root.fork() for _ in range(samples)]
    outputs = await inferlet.gather(*(run(f, sampler(i), limit) for i, f in enumerate(forks)))
    for f in forks:
        f.release()
    root.release()
    for out in outputs:
        out["text"] = prefix + out["text"]
    return json.dumps({"mode": mode, "outputs": outputs, "prefix": prefix})
