"""Automatic prefix caching for inferlet contexts, and copy-on-write of shared pages.

A context's first pass (a ``generate`` from an empty context, or a forward pass writing
positions ``0..n-1`` into fresh pages) consults the runtime's prefix cache, the one the
OpenAI path uses: the full pages of its tokens that are cached are taken by reference
(the pass computes only the rest), and once the pass has run, the full pages it wrote
are published to the cache. So agents that each fill the same system prompt share its
KV without naming it; ``export``/``import`` stays for explicit, persistent sharing.

Only full pages are shared, and a context only appends after them, so its own passes
never write a shared page. What can write one is the guest's page surgery: ``mask`` and
``copy`` into a page with more than one holder first give the instance a private copy
(``own_page``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from loom.engine.prefix_cache import chain_keys
from loom.engine.worker import CopySlotsOp, ResetPagesOp

if TYPE_CHECKING:
    from loom.runtime.commands import ForwardCmd
    from loom.runtime.generate_task import GenerateTask
    from loom.runtime.instance import Instance
    from loom.runtime.services import RuntimeServices


def match_generation(rt: RuntimeServices, inst: Instance, task: GenerateTask) -> None:
    """A generation from an empty context: start it from the cached full pages of its
    prompt, and have its prompt's full pages published once they are written."""
    if task.pages or task.kv_len or task.position:
        return
    ps = rt.page_size
    prompt = task.pending
    # At least one prompt token goes through the model: its pass samples the first token.
    matched = rt.prefix_cache.match(chain_keys(prompt, ps, (len(prompt) - 1) // ps))
    task.cache_prompt = list(prompt)
    if not matched:
        return
    k = len(matched) * ps
    task.pages = inst.pages.adopt(matched)
    task.kv_len = task.position = k
    task.pending = prompt[k:]
    rt.stats.context_cached_tokens += k


def publish_generation(rt: RuntimeServices, inst: Instance, task: GenerateTask) -> None:
    """The generation's prompt pass returned: its full pages go to the prefix cache."""
    prompt, task.cache_prompt = task.cache_prompt, None
    if prompt is None or not rt.prefix_cache.enabled:
        return
    full = min(len(prompt) // rt.page_size, len(task.pages))
    try:
        physical = inst.pages.physical(task.pages[:full])
    except Exception:  # the guest let go of them meanwhile: nothing to publish
        return
    rt.prefix_cache.insert(chain_keys(prompt, rt.page_size, full), physical)


def match_forward(rt: RuntimeServices, inst: Instance, cmd: ForwardCmd) -> None:
    """A plain causal pass writing positions ``0..n-1`` from the first slot of its pages:
    the cached full pages of its tokens replace the guest's fresh ones (the pass computes
    only the rest). Called when the pass is taken into a batch (its pages are bound)."""
    n = len(cmd.tokens)
    ps = rt.page_size
    if (
        n <= ps
        or cmd.positions[0] != 0
        or cmd.masks is not None
        or cmd.is_ahead
        or cmd.kv_send is not None
        or (len(cmd.pages) - 1) * ps + cmd.last_page_len != n
        or cmd.positions != list(range(n))
    ):
        return
    # Outputs stay computed: only pages wholly before the first output (and before the
    # last token) are taken from the cache.
    first_out = min((o.index for o in cmd.outputs), default=n - 1)
    limit = min(first_out, n - 1) // ps
    tokens = list(cmd.tokens)
    matched = rt.prefix_cache.match(chain_keys(tokens, ps, limit)) if limit else []
    k = len(matched)
    for v, new in zip(cmd.pages[:k], matched, strict=True):
        old = inst.pages.table[v]
        inst.pages.table[v] = new  # the reference ``match`` took is the instance's now
        rt.pool.free([old])  # the guest's fresh page, never written
    physical = inst.pages.physical(cmd.pages[: n // ps])
    rt.pool.incref(physical)  # held until published (the guest may free them meanwhile)
    cmd.publish = (tokens, physical)
    if not k:
        return
    cut = k * ps
    cmd.tokens = tokens[cut:]
    cmd.positions = cmd.positions[cut:]
    cmd.outputs = [replace(o, index=o.index - cut) for o in cmd.outputs]
    rt.stats.context_cached_tokens += cut


def publish_forward(rt: RuntimeServices, cmd: ForwardCmd, ok: bool) -> None:
    """The pass returned: publish its full pages (when it ran) and drop their holds."""
    if cmd.publish is None:
        return
    tokens, physical = cmd.publish
    cmd.publish = None
    if ok:
        rt.prefix_cache.insert(chain_keys(tokens, rt.page_size, len(physical)), physical)
    rt.pool.free(physical)


def own_page(rt: RuntimeServices, inst: Instance, virtual: int) -> int | None:
    """The physical page behind ``virtual``, copied first when others hold it too (the
    instance is about to change it); None: no page free for the copy yet (wait)."""
    (page,) = inst.pages.physical([virtual])
    if not rt.pool.is_shared(page):
        return page
    got = rt.allocate_pages(inst, 1)
    if got is None:
        return None
    (copy,) = got
    fresh_copy(rt, page, copy)
    inst.pages.table[virtual] = copy
    rt.pool.free([page])
    return copy


def fresh_copy(rt: RuntimeServices, src: int, dst: int, so: int = 0, do: int = 0,
               size: int | None = None) -> None:  # fmt: skip
    """Copy slots into ``dst``; freshly allocated pages are cleared first, as the next
    batch would clear them (which would wipe the copy)."""
    fresh = rt.pool.drain_fresh()
    if fresh:
        rt.track_op(ResetPagesOp(fresh))
    rt.track_op(CopySlotsOp(src, dst, so, do, rt.page_size if size is None else size))
