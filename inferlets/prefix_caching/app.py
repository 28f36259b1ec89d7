"""Prefix caching: a long shared prefix (a system prompt, a document) computed once per
server and kept as a persistent export; every later run imports its KV and computes only
its own tokens.

    loom run inferlets/prefix_caching -- "A long document ..." "Question: ..." 32

Arguments: ``prefix prompt [max_tokens]``. The prefix is exported under a name derived
from its text, so runs with the same prefix share it and different prefixes do not.
The reply is JSON: ``{"text", "imported"}`` (``imported``: the prefix came from an
earlier run's export, not computed here).
"""

import hashlib
import json

import inferlet
from inferlet.sharing import is_exported, shared_context


async def main(args: list[str]) -> str | None:
    if len(args) < 2:
        raise ValueError("usage: prefix prompt [max_tokens]")
    prefix, prompt = args[0], args[1]
    max_tokens = int(args[2]) if len(args) > 2 else 32
    name = "prefix_caching/" + hashlib.sha256(prefix.encode()).hexdigest()[:16]
    existed = is_exported(name)
    ctx = await shared_context(inferlet.get_model(), name, prefix)
    ctx.fill(prompt)
    text = await ctx.generate(max_tokens=max_tokens, stop=inferlet.IgnoreEos())
    ctx.release()
    return json.dumps({"text": text, "imported": existed})
