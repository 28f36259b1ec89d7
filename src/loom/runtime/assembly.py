"""Batch assembly: the forward work at the heads of queues, merged into one engine batch.

``assemble`` takes each head's run of forward commands (a pass ahead of a running pass
alone), flattens their tokens, positions, page tables, masks and outputs into one
``ForwardBatch`` and records which command owns which slice of the outputs (a
``Flight``). ``plan_generations`` lets the worker go on with a batch of host-driven
generations for a chunk of tokens without a round trip per token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loom.engine.batch import ForwardBatch
from loom.engine.worker import GenPlan
from loom.runtime import context_cache
from loom.runtime.batcher import take_forward_run, take_pass_ahead
from loom.runtime.commands import CommandQueue, ForwardCmd, GenerateCmd, head_tokens
from loom.runtime.eager import EagerCommands
from loom.runtime.flight import Flight, Part
from loom.runtime.guests import Guests
from loom.runtime.host.forward_pass import output_spec
from loom.runtime.instance import Instance
from loom.runtime.services import RuntimeServices
from loom.runtime.wasm.ffi import HostCallError


@dataclass
class Assembled:
    """One batch, ready to send: the batch, its flight, and what rides with it."""

    batch: ForwardBatch
    flight: Flight
    kv_sends: list[Any] = field(default_factory=list)  # KV to ship once its layers are done
    chain: list[tuple[int, int]] = field(default_factory=list)  # (row, output it copies)
    all_heads_taken: bool = True  # every head given rode (none left out by the token cap)
    only_generations: bool = True  # every part a host-driven generation (chunks may follow)


def assemble(
    rt: RuntimeServices,
    guests: Guests,
    eager: EagerCommands,
    heads: list[CommandQueue],
    after: Flight | None,
    poke: Callable[[], None],
) -> Assembled | None:
    """The batch of the forward work at ``heads`` (None if nothing could ride). ``after``:
    the batch in flight that passes ahead among the heads follow (their tokens come from
    it). ``poke`` asks the loop for a turn more: commands wait behind the passes taken.
    Instances over their token budget, or whose work is bad, are killed."""
    tokens: list[int] = []
    positions: list[int] = []
    indptr = [0]
    tables: list[list[int]] = []
    lasts: list[int] = []
    outputs: list[Any] = []
    masks: list[list[list[int]] | None] = []
    any_mask = False
    parts: list[Part] = []
    kv_sends: list[Any] = []
    chain: list[tuple[int, int]] = []
    taken_heads = 0
    only_generations = True
    config = rt.config
    max_tokens = config.max_batch_tokens
    for q in heads:
        inst = guests.by_seq.get(q.owner)
        if inst is None:
            continue
        if tokens and len(tokens) + head_tokens(q) > max_tokens:
            break
        # A pass ahead of a running pass goes alone (its token is not known here).
        head = q.peek()
        ahead = after is not None and isinstance(head, ForwardCmd) and not head.ready()
        taken = take_pass_ahead(q) if ahead else take_forward_run(q)
        taken_heads += 1
        if q.head < len(q.cmds):
            poke()  # what follows the passes taken may run now
        for cmd in taken:
            try:
                if isinstance(cmd, GenerateCmd):
                    seq = generate_inputs(rt, eager, inst, cmd)
                    if seq is None:
                        break  # waiting for pages
                    toks, pos, pages, last, outs, rows = seq
                else:
                    if cmd.positions and cmd.positions[0] == 0:  # a context's first pass
                        context_cache.match_forward(rt, inst, cmd)
                    toks, pos, last, outs, rows = (
                        cmd.tokens, cmd.positions, cmd.last_page_len, cmd.outputs, cmd.masks
                    )  # fmt: skip
                    pages = inst.pages.physical(cmd.pages)
            except HostCallError as e:
                guests.kill(inst, str(e))
                break
            inst.tokens += len(toks)
            if inst.tokens > config.token_budget:
                guests.kill(inst, f"token budget of {config.token_budget} exceeded")
                break
            base = len(tokens)
            out_start = len(outputs)
            tokens += toks
            positions += pos
            indptr.append(len(tokens))
            tables.append(pages)
            lasts.append(last)
            masks.append(rows)
            any_mask = any_mask or rows is not None
            for o in outs:
                outputs.append(output_spec(o.index + base, o))
            parts.append((inst, q, cmd, out_start, len(outputs)))
            if isinstance(cmd, ForwardCmd):
                only_generations = False
                q.inflight += 1
                if cmd.kv_send is not None:
                    kv_sends.append(cmd.kv_send)
                cmd.out_index = out_start  # where a pass ahead finds its token
                src = cmd.ahead_of
                if src is not None and not src.future.done:
                    chain.append((base, src.out_index))
    if not parts:
        return None
    batch = ForwardBatch(
        token_ids=tokens,
        positions=positions,
        seq_indptr=indptr,
        page_tables=tables,
        last_page_lens=lasts,
        outputs=outputs,
        masks=masks if any_mask else None,
    )
    flight = Flight(parts, kv_sends=bool(kv_sends))
    for _, _, cmd, _, _ in parts:
        if isinstance(cmd, ForwardCmd):
            cmd.flight = flight
            if cmd.is_ahead or cmd.then is not None:
                flight.chained_parts += 1
                flight.followers_queued += cmd.then is not None
    return Assembled(batch, flight, kv_sends, chain, taken_heads == len(heads), only_generations)


def generate_inputs(
    rt: RuntimeServices, eager: EagerCommands, inst: Instance, cmd: GenerateCmd
) -> Any:
    """A host generation's next step (tokens, positions, pages, last page length, its
    output, no mask), its pages allocated first; None while pages are short."""
    task = cmd.task
    extra = task.pages_needed(rt.page_size)
    if extra:
        phys = eager.allocate_pages(inst, extra, cmd)
        if phys is None:
            return None
        task.pages += inst.pages.adopt(phys)
    toks, pos, last, out = task.step_inputs(rt.page_size)
    return toks, pos, inst.pages.physical(task.pages), last, [out], None


def plan_generations(rt: RuntimeServices, flight: Flight) -> list[GenPlan]:
    """When a batch holds only host-driven generations (the caller checks) and nothing
    else can arrive before it returns, let the worker go on with them for up to
    ``generate_chunk`` tokens (no round trip per token). Pages for those tokens are
    taken now, only if free; a generation that stops early gives the spare ones back."""
    chunk = rt.config.generate_chunk
    if chunk <= 0:
        return []
    # A generation's first token goes out at once (time to first token); the chunks
    # only speed up the tokens after it.
    if any(not c.task.tokens for _, _, c, _, _ in flight.parts):  # type: ignore[union-attr]
        return []
    ps = rt.page_size
    pool = rt.pool
    plans: list[GenPlan] = []
    for k, (inst, _, cmd, a, _) in enumerate(flight.parts):
        task = cmd.task  # type: ignore[union-attr]
        if task.logprobs is not None:
            continue  # the worker's continuation returns tokens only
        kv_after = task.kv_len + len(task.pending)
        steps = min(chunk, task.stop.max_tokens - len(task.tokens) - 1)
        if steps <= 0:
            continue
        extra = -(-(kv_after + steps) // ps) - len(task.pages)
        if extra > 0:
            if pool.can_allocate(extra):
                task.pages += inst.pages.adopt(pool.allocate(extra))
            else:
                steps = len(task.pages) * ps - kv_after
        if steps <= 0:
            continue
        flight.plans[k] = len(plans)
        plans.append(GenPlan(
            output=a, pages=inst.pages.physical(task.pages), kv_len=kv_after,
            position=task.position + len(task.pending), sampler=task.sampler,
            seed_count=len(task.tokens) + 1, stop_tokens=task.stop.stop_tokens,
            max_steps=steps, logit_mask=task.logit_mask, logit_bias=task.logit_bias,
            state=task.state_id,
        ))  # fmt: skip
    return plans
