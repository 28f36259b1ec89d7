"""A prefix computed once per server and shared by every inferlet that asks for it.

``await shared_context(model, name, text)`` returns a context holding ``text``: the first
inferlet to ask fills it and exports its KV persistently under ``name``; the others,
including those that ask while it is being computed, import the exported pages (full
pages shared by reference, the partly filled last page recomputed). Agents put their
system prompt and tool documentation here, so a hundred agents prefill it once.
"""

from __future__ import annotations

from inferlet.context import Context, _export_key
from inferlet.io import broadcast, instance_id, store_delete, store_get, store_set, subscribe
from inferlet.model import Model


def _claim_key(name: str) -> str:
    return f"loom.prefix-claim/{name}"


def _ready_topic(name: str) -> str:
    return f"loom.prefix-ready/{name}"


async def shared_context(model: Model, name: str, text: str) -> Context:
    """A context with ``text`` in its KV, computed by the first caller for ``name``."""
    ctx = await _try_import(model, name)
    if ctx is not None:
        return ctx
    claim = _claim_key(name)
    if store_get(claim) is None:
        # (Claiming and exporting run on the runtime thread between this guest's turns:
        # the get and set above and below see no other guest in between unless this one
        # is preempted right there, which would only make two builders.)
        store_set(claim, instance_id())
        return await _build(model, name, text)
    sub = subscribe(_ready_topic(name))
    try:
        ctx = await _try_import(model, name)  # it may have become ready meanwhile
        while ctx is None:
            outcome = await sub.__anext__()
            if outcome != "ok":  # the builder failed: compute a private copy
                own = model.create_context()
                own.fill(text)
                return own
            ctx = await _try_import(model, name)
        return ctx
    finally:
        sub.close()


def is_exported(name: str) -> bool:
    """Whether a context is exported under ``name`` (by an earlier run or another one)."""
    return store_get(_export_key(name)) is not None


async def prefix_context(model: Model, name: str | None, text: str) -> Context:
    """``shared_context`` when ``name`` is given, else a private context filled with
    ``text`` (agents switch sharing off this way to measure what it gains)."""
    if name:
        return await shared_context(model, name, text)
    ctx = model.create_context()
    ctx.fill(text)
    return ctx


def branch(ctx: Context, share: bool = True) -> Context:
    """A child of ``ctx`` with the same tokens: ``ctx.fork()`` (its full pages shared by
    reference), or with ``share=False`` a new context filled with the same tokens, all of
    them computed again by its next pass: what sending each branch as a separate prompt
    costs. Techniques take ``share`` so that benchmarks can measure what forking saves."""
    if share:
        return ctx.fork()
    copy = ctx.model.create_context()
    copy.fill_tokens(list(ctx.tokens))
    return copy


async def _try_import(model: Model, name: str) -> Context | None:
    try:
        return await Context.import_(model, name)
    except ValueError:
        return None


async def _build(model: Model, name: str, text: str) -> Context:
    ctx = model.create_context()
    ctx.fill(text)
    try:
        ctx.flush()
        await ctx.export(name, persistent=True)
    except Exception:
        store_delete(_claim_key(name))  # a later caller builds it again
        broadcast(_ready_topic(name), "failed")
        raise
    broadcast(_ready_topic(name), "ok")
    return ctx
