"""Speculative decoding with real drafters: greedy output, several tokens per pass when
the text repeats itself (code, documents that quote themselves, loops).

    loom run inferlets/speculative_decoding -- "A document that quotes itself" 64

Arguments: ``prompt [max_tokens] [drafter] [shape]``.

- drafter ``lookup`` (prompt lookup): after the context's last n tokens (n = 3, then 2,
  then 1), propose the tokens that followed their latest earlier occurrence in the
  context; ``suffix``: the same, and when the context has no match, an LRU cache of the
  n-grams of earlier runs' outputs (kept in the store, shared by every run on the server).
- shape ``chain``: one guess; ``tree``: the continuations of the latest two occurrences as
  branches of one draft tree, verified in the same pass.

Every step verifies the draft in one forward pass (``Context.generate_speculative``), so
the output is exactly the greedy output whatever the drafter proposes. The reply is JSON:
``{"tokens", "text", "passes", "accepted", "proposed"}``.
"""

import json

import inferlet

CACHE_KEY = "speculative_decoding/suffix-cache"
CACHE_SIZE = 4096  # n-grams kept


class LookupDrafter:
    """Prompt lookup over the context, indexed incrementally (no rescans per step)."""

    def __init__(self, depth: int = 6, shape: str = "chain", cache: dict | None = None):
        self.depth, self.shape, self.cache = depth, shape, cache
        self.index: dict[tuple[int, ...], list[int]] = {}  # n-gram -> its last two ends
        self.seen = 0
        self.passes = self.accepted = self.proposed = 0

    def _grow(self, tokens: list[int]) -> None:
        for end in range(max(self.seen, 1), len(tokens)):
            for n in (1, 2, 3):
                if end >= n:
                    key = tuple(tokens[end - n : end])
                    ends = self.index.setdefault(key, [])
                    ends.append(end)
                    del ends[:-2]
        self.seen = len(tokens)

    def draft(self, tokens: list[int]) -> list:
        self.passes += 1
        # Index every n-gram that has a known continuation (all but the last token's).
        self._grow(tokens[:-1] if len(tokens) > 1 else tokens)
        for n in (3, 2, 1):
            if len(tokens) < n:
                continue
            ends = self.index.get(tuple(tokens[-n:]))
            if ends:
                chains = [tokens[e : e + self.depth] for e in reversed(ends)]
                return self._shape([c for c in chains if c])
        if self.cache is not None:
            for n in (3, 2):
                hit = self.cache.get(" ".join(map(str, tokens[-n:])))
                if hit:
                    return list(hit[: self.depth])
        return []

    def _shape(self, chains: list[list[int]]) -> list:
        if not chains:
            return []
        if self.shape != "tree" or len(chains) == 1:
            return chains[0]
        first, second = chains[0], chains[1]
        nodes = [(t, i - 1) for i, t in enumerate(first)]
        common = 0
        while common < min(len(first), len(second)) and first[common] == second[common]:
            common += 1
        parent = common - 1  # the second branches off where it differs from the first
        for t in second[common:]:
            nodes.append((t, parent))
            parent = len(nodes) - 1
        return nodes

    def feedback(self, accepted: int, proposed: int) -> None:
        self.accepted += accepted
        self.proposed += proposed


def load_cache() -> dict:
    raw = inferlet.store_get(CACHE_KEY)
    return json.loads(raw) if raw else {}


def save_cache(cache: dict, output: list[int]) -> None:
    """Add the output's n-grams (n = 2, 3) and what followed them; oldest out first."""
    for n in (2, 3):
        for i in range(n, len(output)):
            key = " ".join(map(str, output[i - n : i]))
            cache.pop(key, None)  # (re-inserted: most recent last)
            cache[key] = output[i : i + 6]
    while len(cache) > CACHE_SIZE:
        cache.pop(next(iter(cache)))
    inferlet.store_set(CACHE_KEY, json.dumps(cache))


async def main(args: list[str]) -> str | None:
    prompt = args[0] if args else "def add(a, b):\n    return a + b\n\ndef add("
    max_tokens = int(args[1]) if len(args) > 1 else 64
    kind = args[2] if len(args) > 2 else "lookup"
    shape = args[3] if len(args) > 3 else "chain"
    if kind not in ("lookup", "suffix") or shape not in ("chain", "tree"):
        raise ValueError("drafter must be lookup or suffix, shape chain or tree")
    cache = load_cache() if kind == "suffix" else None
    model = inferlet.get_model()
    ctx = model.create_context()
    ctx.fill(prompt)
    drafter = LookupDrafter(shape=shape, cache=cache)
    out = await ctx.generate_speculative(drafter, max_tokens)
    ctx.release()
    if cache is not None:
        save_cache(cache, out)
    return json.dumps({
        "tokens": out, "text": model.tokenizer.decode(out), "passes": drafter.passes,
        "accepted": drafter.accepted, "proposed": drafter.proposed,
    })  # fmt: skip
