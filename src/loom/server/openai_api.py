"""The OpenAI-compatible API: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

Every choice is one host-driven completion in the runtime (``Runtime.submit_completion``),
so these requests share engine batches with inferlet traffic and, through the runtime's
prefix cache, reuse the KV of earlier prompts.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from loom.api.errors import ApiError
from loom.api.openai_models import ChatCompletionRequest, CompletionRequest
from loom.engine.batch import OutputResult, SamplerSpec
from loom.runtime.completions import CompletionHandle, CompletionResult
from loom.runtime.completions import CompletionRequest as RuntimeRequest
from loom.server.auth import require_key
from loom.server.openai_stream import Piece, account, choice, stream, usage
from loom.server.state import ServerState
from loom.server.structured import compile_off_loop, template_messages

router = APIRouter(dependencies=[Depends(require_key)])

# A prompt longer than this many characters per token of the context cannot fit, whatever
# the tokenizer: refused before tokenizing. Prompts longer than OFF_LOOP_CHARS are
# tokenized on a thread, so a large one does not hold up every other request.
MAX_CHARS_PER_TOKEN = 128
OFF_LOOP_CHARS = 50_000


def _state(request: Request) -> ServerState:
    return request.app.state.loom  # type: ignore[no-any-return]


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(_state(request))]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    st = _state(request)
    _check_model(st, model_id)
    return _model_card(st)


def _model_card(st: ServerState) -> dict[str, Any]:
    return {"id": st.model_name, "object": "model", "created": int(st.started_at),
            "owned_by": "loom", "max_model_len": st.runtime.max_model_len}  # fmt: skip


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Any:
    st = _state(request)
    st.count("completions")
    _check_model(st, body.model)
    prompts = await _completion_prompts(st, body)
    return await serve_choices(st, body, prompts, chat=False, logprobs=body.logprobs,
                               request=request)  # fmt: skip


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    st = _state(request)
    st.count("chat_completions")
    _check_model(st, body.model)
    tok = st.runtime.tokenizer
    _check_length(st, sum(len(m.text()) for m in body.messages), "messages")
    messages, tools = template_messages(body, tok.chat_template)
    try:
        text = tok.apply_chat_template(messages, tools=tools)
    except Exception as e:  # no template, or the template rejected the messages
        raise ApiError(400, f"cannot apply the chat template: {e}", param="messages") from None
    if body.max_completion_tokens is not None:
        body.max_tokens = body.max_completion_tokens
    prompt = checked_prompt(st, await _encode(st, text, "messages"), "messages")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    grammar = await compile_off_loop(st.runtime.grammars.compile, body)
    return await serve_choices(st, body, [prompt], chat=True, logprobs=logprobs, grammar=grammar,
                               request=request)  # fmt: skip


# ===== shared =====


def _check_model(st: ServerState, model: str) -> None:
    if model not in (st.model_name, st.config.engine.model):
        raise ApiError(404, f"model {model!r} does not exist (this server has {st.model_name!r})",
                       param="model", code="model_not_found", kind="not_found_error")  # fmt: skip


def _check_length(st: ServerState, chars: int, param: str) -> None:
    limit = st.runtime.max_model_len * MAX_CHARS_PER_TOKEN
    if chars > limit:
        raise ApiError(400, f"the prompt has {chars} characters; this model's context of "
                       f"{st.runtime.max_model_len} tokens holds fewer", param=param)  # fmt: skip


async def _encode(st: ServerState, text: str, param: str) -> list[int]:
    _check_length(st, len(text), param)
    enc = st.runtime.tokenizer.encode
    if len(text) > OFF_LOOP_CHARS:
        return await asyncio.to_thread(enc, text)
    return enc(text)


async def _completion_prompts(st: ServerState, body: CompletionRequest) -> list[list[int]]:
    p = body.prompt
    if isinstance(p, str):
        raw = [await _encode(st, p, "prompt")]
    elif all(isinstance(x, str) for x in p):
        raw = [await _encode(st, x, "prompt") for x in p]  # type: ignore[arg-type]
    elif all(isinstance(x, int) for x in p):
        raw = [list(p)]  # type: ignore[arg-type]
    else:
        raw = [list(x) for x in p]  # type: ignore[arg-type]
    return [checked_prompt(st, ids, "prompt") for ids in raw]


def checked_prompt(st: ServerState, ids: list[int], param: str) -> list[int]:
    vocab = st.runtime.vocab_size
    if any(not 0 <= t < vocab for t in ids):
        raise ApiError(400, f"token ids must lie in [0, {vocab})", param=param)
    if not ids:
        raise ApiError(400, "the prompt is empty", param=param)
    if len(ids) >= st.runtime.max_model_len:
        raise ApiError(400, f"the prompt has {len(ids)} tokens; this model's context is "
                       f"{st.runtime.max_model_len}", param=param)  # fmt: skip
    return ids


def _sampler(body: Any, choice: int) -> SamplerSpec:
    seed = body.seed
    if seed is not None:
        seed = (seed + choice) & 0xFFFFFFFFFFFFFFFF  # n choices from one seed must differ
    if body.temperature == 0:
        return SamplerSpec(seed=seed)
    return SamplerSpec(body.temperature, body.top_k, body.top_p, body.min_p, seed)


class _Run:
    """One choice in flight: its runtime handle, streamed pieces, and the result."""

    def __init__(self, st: ServerState, body: Any, prompt: list[int], choice: int,
                 logprobs: int | None, stream: bool, submit: Submit | None = None,
                 grammar: str | None = None) -> None:  # fmt: skip
        loop = asyncio.get_running_loop()
        self.index = choice
        self.done: asyncio.Future[CompletionResult] = loop.create_future()
        self.pieces: asyncio.Queue[Piece | CompletionResult] | None = (
            asyncio.Queue() if stream else None
        )
        pieces = self.pieces

        def on_done(result: CompletionResult) -> None:  # runtime thread
            loop.call_soon_threadsafe(_set, self.done, result)
            if pieces is not None:
                loop.call_soon_threadsafe(pieces.put_nowait, result)

        def on_delta(text: str, token: int, out: OutputResult | None) -> None:  # runtime thread
            assert pieces is not None
            loop.call_soon_threadsafe(pieces.put_nowait, (text, token, out))

        # (None: as many as the context holds; ``new_token_budget`` clamps in the runtime.)
        max_tokens = body.max_tokens
        self.handle = (submit or st.runtime.submit_completion)(
            RuntimeRequest(
                prompt=prompt,
                sampler=_sampler(body, choice),
                max_tokens=max_tokens,
                on_done=on_done,
                stop_strings=tuple(body.stops),
                stop_at_eos=not body.ignore_eos,
                logprobs=logprobs,
                on_delta=on_delta if stream else None,
                grammar=grammar,
                logit_bias=_logit_bias(st, body),
                presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty,
            )
        )


Submit = Callable[[RuntimeRequest], CompletionHandle]


def _logit_bias(st: ServerState, body: Any) -> tuple[tuple[int, ...], tuple[float, ...]] | None:
    if not body.logit_bias:
        return None
    ids = tuple(int(k) for k in body.logit_bias)
    if any(not 0 <= t < st.runtime.vocab_size for t in ids):
        raise ApiError(400, f"logit_bias: token ids must lie in [0, {st.runtime.vocab_size})",
                       param="logit_bias")  # fmt: skip
    return ids, tuple(float(v) for v in body.logit_bias.values())


DISCONNECT_POLL_S = 0.25


class _ClientGone(Exception):
    """The client of a non-streaming request disconnected before its answer."""


async def _unless_gone(request: Request | None, work: asyncio.Future[Any]) -> Any:
    """``work``'s result; ``_ClientGone`` (``work`` cancelled) once the client left."""
    if request is None:
        return await work

    async def gone() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)

    watcher = asyncio.ensure_future(gone())
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if work not in done:
        work.cancel()
        raise _ClientGone
    return work.result()


def _error_of(error: str) -> ApiError:
    """A failed generation as an HTTP error: refusals carry their status as a prefix
    (``"409 transfer_incomplete: ..."``), anything else is the server's fault."""
    head, _, rest = error.partition(" ")
    if head.isdigit() and len(head) == 3 and ":" in rest:
        code, _, message = rest.partition(": ")
        return ApiError(int(head), message, code=code)
    return ApiError(500, f"generation failed: {error}", kind="server_error")


def _set(fut: asyncio.Future[CompletionResult], result: CompletionResult) -> None:
    if not fut.done():
        fut.set_result(result)


async def serve_choices(st: ServerState, body: Any, prompts: list[list[int]], *, chat: bool,
                 logprobs: int | None, submit: Submit | None = None,
                 grammar: str | None = None, request: Request | None = None) -> Any:  # fmt: skip
    """Run every choice of every prompt (``submit`` starts one; default: a runtime
    completion; ``grammar``: checked grammar text every choice follows) and answer as
    OpenAI does, streaming or not. With ``request``, a non-streaming answer is abandoned
    (its completions cancelled) when the client goes away."""
    runs = [
        _Run(st, body, prompt, i * body.n + j, logprobs, body.stream, submit, grammar)
        for i, prompt in enumerate(prompts)
        for j in range(body.n)
    ]
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    if body.stream:
        return StreamingResponse(
            stream(st, body, runs, rid, created, chat, logprobs),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    try:
        results = await _unless_gone(request, asyncio.gather(*(r.done for r in runs)))
    except (asyncio.CancelledError, _ClientGone) as gone:  # the client went away
        for r in runs:
            r.handle.cancel()
        if isinstance(gone, _ClientGone):  # nobody reads it: the status is for the logs
            return Response(status_code=499)
        raise
    for res in results:
        if res.error is not None:
            raise _error_of(res.error)
    account(st, results)
    choices = [
        choice(st, body, r.index, res, chat, logprobs) for r, res in zip(runs, results, strict=True)
    ]
    return JSONResponse({
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": st.model_name,
        "choices": choices,
        "usage": usage(results, len(prompts), body.n),
    })  # fmt: skip
