"""Host-driven completions: plain generation requests (the OpenAI API) run by the runtime.

A completion is a guest-less instance: it owns KV pages and one command queue holding a
``GenerateCmd``, so its steps ride in the same engine batches as every inferlet's forward
passes. The prompt's full pages are looked up in a prefix cache over the runtime's page
pool first (automatic prefix caching across requests); when the generation ends, the full
pages of prompt + output go back into that cache, where they stay until the pool needs
them (the cache is the pool's reclaimer: it gives pages back only when allocation is
short).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loom.engine.batch import OutputResult, SamplerSpec
from loom.engine.prefix_cache import PrefixCache, chain_keys
from loom.engine.stopping import new_token_budget
from loom.runtime.commands import GenerateCmd
from loom.runtime.generate_task import GenerateTask, StopConditions
from loom.runtime.instance import Instance, InstanceHandle, Kill
from loom.runtime.resources import InstancePages
from loom.runtime.wasm.ffi import GuestStore

if TYPE_CHECKING:
    from loom.runtime.services import RuntimeServices

_ids = itertools.count(1)


@dataclass
class CompletionRequest:
    """One generation. ``on_delta`` (optional) streams ``(text, token, output)`` per output
    token (``output``: its logprobs, when asked for)
    and ``on_done`` receives the result; both run on the runtime thread and must not
    block."""

    prompt: list[int]
    sampler: SamplerSpec
    max_tokens: int | None  # None: as many as the context holds
    on_done: Callable[[CompletionResult], None]
    stop_strings: tuple[str, ...] = ()
    stop_tokens: tuple[int, ...] = ()
    stop_at_eos: bool = True
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: plus the top k
    on_delta: Callable[[str, int, OutputResult | None], None] | None = None
    # Checked grammar text (``Runtime.grammars.compile``): every token obeys it, and the
    # generation ends at end-of-sequence once the grammar is complete.
    grammar: str | None = None
    logit_bias: tuple[tuple[int, ...], tuple[float, ...]] | None = None  # (ids, values)
    presence_penalty: float = 0.0  # as the OpenAI API defines them, over output tokens
    frequency_penalty: float = 0.0


@dataclass
class CompletionResult:
    tokens: list[int]
    text: str
    finish_reason: str  # "stop" | "length" | "error"
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache
    outputs: list[OutputResult] = field(default_factory=list)  # per token, with logprobs
    error: str | None = None


class CompletionHandle:
    """Cancel a submitted completion (a client that went away); safe from any thread."""

    def __init__(self, job_id: str, post: Callable[[Any], None]) -> None:
        self.id = job_id
        self._post = post

    def cancel(self) -> None:
        self._post(Kill(self.id, "cancelled by the client"))


@dataclass(eq=False)
class CompletionJob:
    request: CompletionRequest
    task: GenerateTask | None = None
    cached_tokens: int = 0
    reported: bool = False

    def report(self, result: CompletionResult) -> None:
        if not self.reported:
            self.reported = True
            self.request.on_done(result)


def new_handle(post: Callable[[Any], None]) -> CompletionHandle:
    return CompletionHandle(f"cmpl-{next(_ids)}", post)


def new_host_instance(rt: RuntimeServices, instance_id: str, job: object) -> Instance:
    """A guest-less instance: owns pages and queues like an inferlet, runs no code."""
    inst = Instance(
        seq=rt.next_seq(),
        id=instance_id,
        program="<host>",
        arguments=[],
        store=GuestStore(rt.wasm, memory_limit=0, slice_ticks=1),
        pages=InstancePages(rt.pool),
        handle=InstanceHandle(instance_id, rt.post),
        started=True,
        job=job,
    )
    rt.register_instance(inst)
    return inst


def start_completion(
    rt: RuntimeServices,
    cache: PrefixCache,
    handle_id: str,
    req: CompletionRequest,
    prefilled: tuple[Instance, list[int], int] | None = None,
) -> None:
    """Runtime thread: make the guest-less instance and queue its generation.

    ``prefilled``: an existing host instance with its (virtual) pages whose first
    ``kv_len`` slots already hold the prompt's KV (received from another engine); the
    prefix cache is not consulted then."""
    ps = rt.page_size
    prompt = req.prompt
    job = CompletionJob(req)
    if not prompt or len(prompt) >= rt.max_model_len:
        job.report(_failed(req, f"the prompt must hold 1 to {rt.max_model_len - 1} tokens"))
        if prefilled is not None:
            rt.end_instance(prefilled[0], False, "bad prompt")
        return
    if prefilled is None:
        # (Not held to --max-instances: a completion runs no code, and what it may hold
        # is bounded by the pool and the page wait.)
        inst = new_host_instance(rt, handle_id, job)
        # At least one prompt token must go through the model to sample the first output.
        full = (len(prompt) - 1) // ps
        matched = cache.match(chain_keys(prompt, ps, full))
        job.cached_tokens = len(matched) * ps
        pages = inst.pages.adopt(matched)
    else:
        inst, pages, kv_len = prefilled
        inst.job = job
        job.cached_tokens = kv_len
    at_eos = req.stop_at_eos or req.grammar is not None  # (a complete grammar allows only EOS)
    stops = set(req.stop_tokens) | (set(rt.eos_token_ids) if at_eos else set())
    task = GenerateTask(
        pages=pages,
        kv_len=job.cached_tokens,
        pending=prompt[job.cached_tokens :],
        position=job.cached_tokens,
        sampler=req.sampler,
        stop=StopConditions(
            new_token_budget(req.max_tokens, len(prompt), rt.max_model_len),
            frozenset(stops),
            tuple(s for s in req.stop_strings if s),
        ),
        logit_mask=None,
        stream=False,
        tokenizer=rt.tokenizer,
        logprobs=req.logprobs,
        on_delta=req.on_delta,
        on_finish=lambda t: _finish(rt, cache, inst, t),
        grammar=req.grammar,
        logit_bias=req.logit_bias,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
    )
    job.task = task
    rt.enqueue(rt.new_queue(inst), GenerateCmd(task))


def _finish(rt: RuntimeServices, cache: PrefixCache, inst: Instance, task: GenerateTask) -> None:
    job: CompletionJob = inst.job
    req = job.request
    ps = rt.page_size
    error = None
    reason = task.finish_reason or "stop"
    if reason.startswith("error"):
        error, reason = reason.partition(": ")[2] or reason, "error"
    else:
        # The KV now holds prompt + all output tokens but the last (never fed back).
        seq = (req.prompt + task.tokens)[: task.kv_len]
        full = min(task.kv_len // ps, len(task.pages))
        cache.insert(chain_keys(seq, ps, full), inst.pages.physical(task.pages[:full]))
    job.report(
        CompletionResult(
            tokens=list(task.tokens),
            text=task.text,
            finish_reason=reason,
            prompt_tokens=len(req.prompt),
            cached_tokens=job.cached_tokens,
            outputs=task.outputs,
            error=error,
        )
    )
    rt.end_instance(inst, error is None, error)


def on_instance_end(inst: Instance, error: str | None) -> None:
    """The runtime ended a host instance (a kill, a cancel, a shutdown)."""
    job = inst.job
    if not isinstance(job, CompletionJob):
        on_end = getattr(job, "on_end", None)
        if on_end is not None:
            on_end(error)
        return
    if not job.reported:
        task = job.task
        job.report(
            CompletionResult(
                tokens=list(task.tokens) if task else [],
                text=task.text if task else "",
                finish_reason="error",
                prompt_tokens=len(job.request.prompt),
                cached_tokens=job.cached_tokens,
                outputs=task.outputs if task else [],
                error=error or "the completion ended",
            )
        )


def _failed(req: CompletionRequest, error: str) -> CompletionResult:
    return CompletionResult([], "", "error", len(req.prompt), 0, error=error)
