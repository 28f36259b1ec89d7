"""``forward``: the forward-pass resource, built up by the guest and executed on a queue."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from loom.engine.batch import OutputSpec, SamplerSpec
from loom.runtime.commands import CommandQueue, ForwardCmd
from loom.runtime.futures import HostFuture
from loom.runtime.host.common import add_future_resource, iface, sampler_spec
from loom.runtime.host.forward_pass import (
    FORWARD_OUTPUT,
    ForwardPassBuilder,
    _check,
    _Out,
    output_spec,
)
from loom.runtime.host.types_sampler import SAMPLER
from loom.runtime.wasm.ffi import (
    STRING,
    U32,
    ComponentLinker,
    Err,
    HostCallError,
    Ok,
    borrow,
    list_of,
    option,
    own,
    result,
)

if TYPE_CHECKING:
    from loom.runtime.instance import Instance
    from loom.runtime.services import RuntimeServices

NAME = iface("forward")


def register(linker: ComponentLinker, rt: RuntimeServices) -> None:
    linker.add_resource(NAME, "forward-pass", lambda key, rep: rt.handles.drop(rep))
    add_future_resource(linker, rt, NAME, "forward-result", result(FORWARD_OUTPUT, STRING))

    def builder(key: int, rep: int) -> ForwardPassBuilder:
        fp: ForwardPassBuilder = rt.handles.get(rt.caller(key).seq, rep, ForwardPassBuilder)
        if fp.executed:
            raise HostCallError("this forward pass was already executed")
        return fp

    def new(key: int, q: int) -> int:
        inst = rt.caller(key)
        queue = rt.handles.get(inst.seq, q, CommandQueue)
        return rt.handles.add(inst.seq, ForwardPassBuilder(queue))

    def set_input(key: int, rep: int, tokens: list[int], positions: list[int]) -> None:
        fp = builder(key, rep)
        fp.tokens += tokens
        fp.positions += positions

    def kv_pages(key: int, rep: int, pages: list[int], last: int) -> None:
        fp = builder(key, rep)
        rt.caller(key).pages.check(pages)
        fp.pages, fp.last_page_len = pages, last

    def attention_mask(key: int, rep: int, rows: list[list[int]]) -> None:
        builder(key, rep).masks = rows

    def out(key: int, rep: int, index: int) -> _Out:
        outputs = builder(key, rep).outputs
        o = outputs.get(index)
        if o is None:
            o = outputs[index] = _Out()
        return o

    def output_token(key: int, rep: int, index: int, s: Any) -> None:
        out(key, rep, index).sampler = sampler_spec(s)

    def output_distribution(key: int, rep: int, index: int, k: int) -> None:
        if not 0 < k <= rt.vocab_size:
            raise HostCallError(f"distribution size must be in [1, {rt.vocab_size}], got {k}")
        out(key, rep, index).top_k_dist = k

    def output_logprobs(key: int, rep: int, index: int, k: int) -> None:
        out(key, rep, index).logprobs = min(k, rt.vocab_size)

    def logit_mask(key: int, rep: int, index: int, brle: list[int]) -> None:
        out(key, rep, index).logit_mask = brle

    def execute(key: int, rep: int) -> int:
        inst = rt.caller(key)
        fp: ForwardPassBuilder = rt.handles.get(inst.seq, rep, ForwardPassBuilder)
        if fp.executed:
            raise HostCallError("this forward pass was already executed")
        fp.executed = True
        outs = fp.outputs
        items = sorted(outs.items()) if len(outs) > 1 else outs.items()
        outputs = [output_spec(i, o) for i, o in items]
        return rt.handles.add(inst.seq, queue_pass(rt, fp, outputs)[0])

    def submit_step(
        inst: Instance,
        q: int,
        tokens: list[int],
        positions: list[int],
        pages: list[int],
        last: int,
        s: Any,
    ) -> HostFuture:
        queue = rt.handles.get(inst.seq, q, CommandQueue)
        inst.pages.check(pages)
        fp = ForwardPassBuilder(queue, tokens, positions, pages, last)
        outputs = [] if s is None else [OutputSpec(len(tokens) - 1, sampler_spec(s))]
        return submit_pass(rt, fp, outputs)

    def step(key: int, q: int, *args: Any) -> int:
        inst = rt.caller(key)
        return rt.handles.add(inst.seq, submit_step(inst, q, *args))

    def step_wait(key: int, q: int, *args: Any) -> PassWait:
        inst = rt.caller(key)
        return PassWait(submit_step(inst, q, *args), inst, rt.waker(inst))

    def step_chain(
        key: int,
        q: int,
        tokens: list[int],
        positions: list[int],
        pages: list[int],
        last: int,
        s: Any,
        next_pages: list[int],
        next_last: int,
    ) -> PassWait:
        inst = rt.caller(key)
        queue = rt.handles.get(inst.seq, q, CommandQueue)
        spec = sampler_spec(s)
        return chain_pass(rt, inst, queue, tokens, positions, pages, last, spec, next_pages,
                          next_last)  # fmt: skip

    def step_settle(key: int, q: int) -> PassWait | Settled:
        inst = rt.caller(key)
        return settle_ahead(rt, inst, rt.handles.get(inst.seq, q, CommandQueue))

    step_params = [borrow("queue"), list_of(U32), list_of(U32), list_of(U32), U32, option(SAMPLER)]
    linker.add_func(NAME, "step", step_params, own("forward-result"), step)
    linker.add_func(NAME, "step-wait", step_params, result(U32, STRING), step_wait, is_async=True)
    chain_params = [*step_params[:5], SAMPLER, list_of(U32), U32]
    linker.add_func(
        NAME, "step-chain", chain_params, result(U32, STRING), step_chain, is_async=True
    )
    linker.add_func(
        NAME, "step-settle", [borrow("queue")], result(option(U32), STRING), step_settle,
        is_async=True,
    )  # fmt: skip
    fp_t = borrow("forward-pass")
    linker.add_func(NAME, "[constructor]forward-pass", [borrow("queue")], own("forward-pass"), new)
    linker.add_func(
        NAME, "[method]forward-pass.input", [fp_t, list_of(U32), list_of(U32)], None, set_input
    )
    linker.add_func(
        NAME, "[method]forward-pass.kv-pages", [fp_t, list_of(U32), U32], None, kv_pages
    )
    linker.add_func(
        NAME, "[method]forward-pass.attention-mask", [fp_t, list_of(list_of(U32))], None,
        attention_mask,
    )  # fmt: skip
    linker.add_func(
        NAME, "[method]forward-pass.output-token", [fp_t, U32, SAMPLER], None, output_token
    )
    linker.add_func(
        NAME, "[method]forward-pass.output-distribution", [fp_t, U32, U32], None,
        output_distribution,
    )  # fmt: skip
    linker.add_func(
        NAME, "[method]forward-pass.output-logprobs", [fp_t, U32, U32], None, output_logprobs
    )
    linker.add_func(
        NAME, "[method]forward-pass.logit-mask", [fp_t, U32, list_of(U32)], None, logit_mask
    )
    linker.add_func(NAME, "[method]forward-pass.execute", [fp_t], own("forward-result"), execute)


class PassWait:
    """The pending result of ``step-wait``: the instance sleeps until its pass is done;
    then the sampled token (0 when none was asked for) or the reason it failed."""

    __slots__ = ("fut",)

    def __init__(self, fut: HostFuture, inst: Instance, wake: Callable[[], None]) -> None:
        self.fut = fut
        if not fut.done:
            fut.waiters.append(wake)
            inst.blocked = self

    def ready(self) -> bool:
        return self.fut.done

    def value(self) -> Ok | Err:
        out = self.fut.value  # Ok(forward-output) or Err(reason)
        if isinstance(out, Err):
            return out
        tokens = out.value[0]
        return Ok(tokens[0] if tokens else 0)


def chain_pass(
    rt: RuntimeServices,
    inst: Instance,
    queue: CommandQueue,
    tokens: list[int],
    positions: list[int],
    pages: list[int],
    last: int,
    spec: SamplerSpec,
    next_pages: list[int],
    next_last: int,
) -> PassWait:
    """``step-chain``: queue the pass over ``tokens`` (none: the queue's pass ahead is
    the one to wait for) and, ahead of it, the next step's pass, whose one input is the
    token it samples; the wait for the former."""
    before = queue.ahead  # the pass to wait for when no tokens come
    if tokens:
        if before is not None:
            raise HostCallError("step-chain: the queue has a pass ahead; settle it first")
        if len(positions) != len(tokens):
            raise HostCallError("step-chain: one position per token")
        next_pos = positions[-1] + 1
    else:
        if before is None:
            raise HostCallError("step-chain: no tokens and no pass ahead to wait for")
        next_pos = before.positions[0] + 1
    # The pass ahead is checked before anything is queued (a dummy token stands for the
    # one it will get: every sampled token is in range).
    inst.pages.check(next_pages)
    ahead_fp = ForwardPassBuilder(queue, [0], [next_pos], next_pages, next_last)
    ahead_out = [OutputSpec(0, spec)]
    problem = _check(ahead_fp, ahead_out, rt)
    if problem is not None:
        raise HostCallError(f"step-chain: the pass ahead is invalid: {problem}")
    if tokens:
        inst.pages.check(pages)
        fp = ForwardPassBuilder(queue, tokens, positions, pages, last)
        fut, queued = queue_pass(rt, fp, [OutputSpec(len(tokens) - 1, spec)])
        if queued is None:  # it cannot run: nothing goes ahead of it
            return PassWait(fut, inst, rt.waker(inst))
        source = queued
    else:
        assert before is not None
        source = before
    ahead = ForwardCmd(
        [0], [next_pos], next_pages, next_last, None, ahead_out, HostFuture(), is_ahead=True
    )
    if source.future.done:  # the guest came back after its pass ahead had returned
        out = source.future.value
        if isinstance(out, Err):  # it failed: nothing can go ahead of it
            queue.ahead = None
            return PassWait(source.future, inst, rt.waker(inst))
        ahead.tokens = [out.value[0][0]]
    else:
        ahead.ahead_of = source
        source.then = ahead
    queue.ahead = ahead
    rt.enqueue(queue, ahead)
    return PassWait(source.future, inst, rt.waker(inst))


def settle_ahead(rt: RuntimeServices, inst: Instance, queue: CommandQueue) -> PassWait | Settled:
    """``step-settle``: drop the queue's pass ahead if it has not reached the engine,
    else the wait for it."""
    ahead, queue.ahead = queue.ahead, None
    if ahead is None:
        return Settled()
    if queue.withdraw(ahead):  # not in a batch yet: dropped
        if ahead.ahead_of is not None:
            ahead.ahead_of.then = None
            ahead.ahead_of = None
        return Settled()
    return PassWait(ahead.future, inst, rt.waker(inst))


class Settled:
    """``step-settle`` with nothing to wait for: no pass ahead, or one dropped unrun."""

    __slots__ = ()

    def ready(self) -> bool:
        return True

    def value(self) -> Ok:
        return Ok(None)


def submit_pass(
    rt: RuntimeServices, fp: ForwardPassBuilder, outputs: list[OutputSpec]
) -> HostFuture:
    """Queue a built pass on its queue; a pass that cannot run resolves with the reason
    at once (checked alone, so it never fails a shared batch)."""
    return queue_pass(rt, fp, outputs)[0]


def queue_pass(
    rt: RuntimeServices, fp: ForwardPassBuilder, outputs: list[OutputSpec]
) -> tuple[HostFuture, ForwardCmd | None]:
    """``submit_pass``, also giving the queued command (None when it cannot run)."""
    fut = HostFuture()
    problem = _check(fp, outputs, rt)
    if problem is not None:
        fut.resolve(Err(problem))
        return fut, None
    cmd = ForwardCmd(fp.tokens, fp.positions, fp.pages, fp.last_page_len, fp.masks, outputs, fut)
    rt.enqueue(fp.queue, cmd)
    return fut, cmd
