"""``generate``: the declarative fast path (a whole generation run by the host loop)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from loom.engine.stopping import new_token_budget
from loom.runtime import context_cache
from loom.runtime.commands import CommandQueue, GenerateCmd
from loom.runtime.generate_task import GenerateTask, StopConditions
from loom.runtime.host.common import add_future_resource, iface, sampler_spec
from loom.runtime.host.grammar_api import HostMatcher
from loom.runtime.host.types_sampler import SAMPLER
from loom.runtime.wasm.ffi import (
    BOOL,
    F32,
    STRING,
    U32,
    ComponentLinker,
    HostCallError,
    borrow,
    list_of,
    option,
    own,
    record,
    result,
    tuple_of,
)

if TYPE_CHECKING:
    from loom.runtime.services import RuntimeServices

NAME = iface("generate")
STOP = record(
    ("max-tokens", U32),
    ("stop-tokens", list_of(U32)),
    ("stop-strings", list_of(STRING)),
    ("stop-at-eos", BOOL),
)
GENERATION = record(
    ("tokens", list_of(U32)),
    ("text", STRING),
    ("finish-reason", STRING),
    ("pages", list_of(U32)),
    ("last-page-len", U32),
    ("logprobs", list_of(F32)),
)


def register(linker: ComponentLinker, rt: RuntimeServices) -> None:
    add_future_resource(linker, rt, NAME, "generate-result", result(GENERATION, STRING))

    def generate(
        key: int,
        q: int,
        pages: list[int],
        last_page_len: int,
        pending: list[int],
        start: int,
        s: Any,
        stop: tuple[int, list[int], list[str], bool],
        logit_mask: list[int] | None,
        stream: bool,
        want_logprobs: bool,
        logit_bias: list[tuple[int, float]] | None,
        constraint: int | None,
    ) -> int:
        inst = rt.caller(key)
        hm = None if constraint is None else rt.handles.get(inst.seq, constraint, HostMatcher)
        queue = rt.handles.get(inst.seq, q, CommandQueue)
        inst.pages.check(pages)
        ps = rt.page_size
        if pages and not 1 <= last_page_len <= ps:
            raise HostCallError(f"generate: last-page-len must be in [1, {ps}]")
        if not pages and last_page_len:
            raise HostCallError("generate: last-page-len must be 0 when there are no pages")
        if not pending:
            raise HostCallError("generate: needs at least one pending token")
        if any(not 0 <= t < rt.vocab_size for t in pending):
            raise HostCallError(f"generate: token id out of range [0, {rt.vocab_size})")
        if logit_mask is not None and sum(logit_mask) != rt.vocab_size:
            raise HostCallError(f"generate: logit mask covers {sum(logit_mask)} ids")
        bias = None
        if logit_bias:
            if any(not 0 <= t < rt.vocab_size for t, _ in logit_bias):
                raise HostCallError(f"generate: logit bias id out of range [0, {rt.vocab_size})")
            if any(not math.isfinite(v) for _, v in logit_bias):
                raise HostCallError("generate: logit bias values must be finite")
            bias = (tuple(t for t, _ in logit_bias), tuple(float(v) for _, v in logit_bias))
        max_tokens, stop_tokens, stop_strings, at_eos = stop
        if start + len(pending) >= rt.max_model_len:
            raise HostCallError("generate: the context is already full")
        # (A complete grammar allows only end-of-sequence: a constrained generation ends there.)
        at_eos = at_eos or hm is not None
        tokens = set(stop_tokens) | (set(rt.eos_token_ids) if at_eos else set())
        kv_len = ps * (len(pages) - 1) + last_page_len if pages else 0
        task = GenerateTask(
            pages=list(pages),
            kv_len=kv_len,
            pending=list(pending),
            position=start,
            sampler=sampler_spec(s),
            stop=StopConditions(
                new_token_budget(max_tokens, start + len(pending), rt.max_model_len),
                frozenset(tokens),
                tuple(x for x in stop_strings if x),
            ),
            logit_mask=logit_mask,
            logit_bias=bias,
            stream=stream,
            tokenizer=rt.tokenizer,
            logprobs=0 if want_logprobs else None,  # (0: the chosen token's only)
        )
        if hm is not None:
            task.grammar, task.grammar_prefix = hm.grammar, list(hm.taken)
            task.on_finish = lambda t: hm.take(t.tokens)
        context_cache.match_generation(rt, inst, task)
        rt.enqueue(queue, GenerateCmd(task))
        return rt.handles.add(inst.seq, task.future)

    linker.add_func(
        NAME,
        "generate",
        [
            borrow("queue"),
            list_of(U32),
            U32,
            list_of(U32),
            U32,
            SAMPLER,
            STOP,
            option(list_of(U32)),
            BOOL,
            BOOL,
            option(list_of(tuple_of(U32, F32))),
            option(U32),  # a matcher's id (a second borrow would fail in wasmtime 50)
        ],
        own("generate-result"),
        generate,
    )
