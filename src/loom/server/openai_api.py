"""The OpenAI-compatible API: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

Every choice is one host-driven completion in the runtime (``Runtime.submit_completion``),
so these requests share engine batches with inferlet traffic and, through the runtime's
prefix cache, reuse the KV of earlier prompts.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from loom.engine.batch import OutputResult, SamplerSpec
from loom.runtime.completions import CompletionHandle, CompletionResult
from loom.runtime.completions import CompletionRequest as RuntimeRequest
from loom.server.auth import require_key
from loom.server.errors import ApiError
from loom.server.openai_models import ChatCompletionRequest, CompletionRequest
from loom.server.state import ServerState

router = APIRouter(dependencies=[Depends(require_key)])


def _state(request: Request) -> ServerState:
    return request.app.state.loom  # type: ignore[no-any-return]


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    st = _state(request)
    return {
        "object": "list",
        "data": [
            {
                "id": st.model_name,
                "object": "model",
                "created": int(st.started_at),
                "owned_by": "loom",
            }
        ],
    }


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Any:
    st = _state(request)
    st.count("completions")
    _check_model(st, body.model)
    prompts = _completion_prompts(st, body)
    return await _serve(st, body, prompts, chat=False, logprobs=body.logprobs)


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    st = _state(request)
    st.count("chat_completions")
    _check_model(st, body.model)
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        text = st.runtime.tokenizer.apply_chat_template(messages)
    except Exception as e:  # no template, or the template rejected the messages
        raise ApiError(400, f"cannot apply the chat template: {e}", param="messages") from None
    if body.max_completion_tokens is not None:
        body.max_tokens = body.max_completion_tokens
    prompt = _checked(st, st.runtime.tokenizer.encode(text), "messages")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return await _serve(st, body, [prompt], chat=True, logprobs=logprobs)


# ===== shared =====


def _check_model(st: ServerState, model: str) -> None:
    if model not in (st.model_name, st.settings.model):
        raise ApiError(404, f"model {model!r} does not exist (this server has {st.model_name!r})",
                       param="model", code="model_not_found", kind="not_found_error")  # fmt: skip


def _completion_prompts(st: ServerState, body: CompletionRequest) -> list[list[int]]:
    p = body.prompt
    enc = st.runtime.tokenizer.encode
    if isinstance(p, str):
        raw = [enc(p)]
    elif all(isinstance(x, str) for x in p):
        raw = [enc(x) for x in p]  # type: ignore[arg-type]
    elif all(isinstance(x, int) for x in p):
        raw = [list(p)]  # type: ignore[arg-type]
    else:
        raw = [list(x) for x in p]  # type: ignore[arg-type]
    return [_checked(st, ids, "prompt") for ids in raw]


def _checked(st: ServerState, ids: list[int], param: str) -> list[int]:
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
                 logprobs: int | None, stream: bool,
                 submit: Submit | None = None) -> None:  # fmt: skip
        loop = asyncio.get_running_loop()
        self.index = choice
        self.done: asyncio.Future[CompletionResult] = loop.create_future()
        self.pieces: asyncio.Queue[tuple[str, int] | CompletionResult] | None = (
            asyncio.Queue() if stream else None
        )
        pieces = self.pieces

        def on_done(result: CompletionResult) -> None:  # runtime thread
            loop.call_soon_threadsafe(_set, self.done, result)
            if pieces is not None:
                loop.call_soon_threadsafe(pieces.put_nowait, result)

        def on_delta(text: str, token: int) -> None:  # runtime thread
            assert pieces is not None
            loop.call_soon_threadsafe(pieces.put_nowait, (text, token))

        max_tokens = body.max_tokens or (st.runtime.max_model_len - len(prompt))
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
            )
        )


Submit = Callable[[RuntimeRequest], CompletionHandle]


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


async def _serve(st: ServerState, body: Any, prompts: list[list[int]], *, chat: bool,
                 logprobs: int | None, submit: Submit | None = None) -> Any:  # fmt: skip
    """Run every choice of every prompt (``submit`` starts one; default: a runtime
    completion) and answer as OpenAI does, streaming or not."""
    runs = [
        _Run(st, body, prompt, i * body.n + j, logprobs, body.stream, submit)
        for i, prompt in enumerate(prompts)
        for j in range(body.n)
    ]
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _stream(st, runs, body.n, rid, created, chat, logprobs, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    try:
        results = await asyncio.gather(*(r.done for r in runs))
    except asyncio.CancelledError:  # the client went away
        for r in runs:
            r.handle.cancel()
        raise
    for res in results:
        if res.error is not None:
            raise _error_of(res.error)
    _account(st, results)
    choices = [
        _choice(st, r.index, res, chat, logprobs) for r, res in zip(runs, results, strict=True)
    ]
    return JSONResponse({
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": st.model_name,
        "choices": choices,
        "usage": _usage(results, len(prompts), body.n),
    })  # fmt: skip


def _account(st: ServerState, results: list[CompletionResult]) -> None:
    st.generated_tokens += sum(len(r.tokens) for r in results)
    st.prompt_tokens += sum(r.prompt_tokens for r in results)


def _usage(results: list[CompletionResult], num_prompts: int, n: int) -> dict[str, Any]:
    # Each prompt counts once, however many choices it has.
    prompt = sum(results[i * n].prompt_tokens for i in range(num_prompts))
    cached = sum(results[i * n].cached_tokens for i in range(num_prompts))
    completion = sum(len(r.tokens) for r in results)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _choice(st: ServerState, index: int, res: CompletionResult, chat: bool,
            logprobs: int | None) -> dict[str, Any]:  # fmt: skip
    choice: dict[str, Any] = {"index": index, "finish_reason": res.finish_reason}
    if chat:
        choice["message"] = {"role": "assistant", "content": res.text}
        choice["logprobs"] = (
            {"content": _chat_logprobs(st, res.tokens, res.outputs)} if logprobs is not None
            else None
        )  # fmt: skip
    else:
        choice["text"] = res.text
        choice["logprobs"] = (
            _text_logprobs(st, res.tokens, res.outputs) if logprobs is not None else None
        )
    return choice


def _piece(st: ServerState, token: int) -> str:
    return st.runtime.tokenizer.decode([token], skip_special_tokens=False)


def _chat_logprobs(st: ServerState, tokens: list[int],
                   outputs: list[OutputResult]) -> list[dict[str, Any]]:  # fmt: skip
    content = []
    for tok, out in zip(tokens, outputs, strict=False):
        text = _piece(st, tok)
        content.append({
            "token": text,
            "logprob": out.logprob,
            "bytes": list(text.encode()),
            "top_logprobs": [
                {"token": (t := _piece(st, i)), "logprob": lp, "bytes": list(t.encode())}
                for i, lp in out.top_logprobs
            ],
        })  # fmt: skip
    return content


def _text_logprobs(st: ServerState, tokens: list[int],
                   outputs: list[OutputResult]) -> dict[str, Any]:  # fmt: skip
    texts = [_piece(st, t) for t in tokens]
    offsets, at = [], 0
    for t in texts:
        offsets.append(at)
        at += len(t)
    return {
        "tokens": texts,
        "token_logprobs": [o.logprob for o in outputs],
        "top_logprobs": [{_piece(st, i): lp for i, lp in o.top_logprobs} for o in outputs],
        "text_offset": offsets,
    }


async def _stream(st: ServerState, runs: list[_Run], n: int, rid: str, created: int,
                  chat: bool, logprobs: int | None,
                  include_usage: bool) -> AsyncIterator[str]:  # fmt: skip
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict[str, Any]], usage: Any = None) -> str:
        frame: dict[str, Any] = {"id": rid, "object": kind, "created": created,
                                 "model": st.model_name, "choices": choices}  # fmt: skip
        if include_usage:
            frame["usage"] = usage
        return f"data: {json.dumps(frame)}\n\n"

    finished: list[CompletionResult | None] = [None] * len(runs)
    try:
        if chat:
            yield chunk([{"index": r.index, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None} for r in runs])  # fmt: skip
        pending = {asyncio.ensure_future(_next(r)): r for r in runs}
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                run = pending.pop(fut)
                item = fut.result()
                if isinstance(item, CompletionResult):
                    finished[runs.index(run)] = item
                    if item.error is not None:
                        err = {"error": {"message": f"generation failed: {item.error}",
                                         "type": "server_error"}}  # fmt: skip
                        yield f"data: {json.dumps(err)}\n\n"
                    yield chunk([_final(run.index, item, chat, logprobs, st)])
                    continue
                text, _token = item
                # One chunk per token, even when its text is held back (an incomplete
                # character) or empty: clients time tokens by chunks.
                yield chunk([_delta(run, text, chat)])
                pending[asyncio.ensure_future(_next(run))] = run
        results = [r for r in finished if r is not None]
        _account(st, results)
        if include_usage:
            yield chunk([], _usage(results, len(runs) // n, n))
        yield "data: [DONE]\n\n"
    finally:
        for r, res in zip(runs, finished, strict=True):
            if res is None:
                r.handle.cancel()  # the client disconnected mid-stream


async def _next(run: _Run) -> tuple[str, int] | CompletionResult:
    """The run's next streamed piece; its result comes last, after every piece."""
    assert run.pieces is not None
    return await run.pieces.get()


def _delta(run: _Run, text: str, chat: bool) -> dict[str, Any]:
    # Logprobs of a streamed choice come whole in its final chunk.
    if chat:
        return {"index": run.index, "delta": {"content": text}, "logprobs": None,
                "finish_reason": None}  # fmt: skip
    return {"index": run.index, "text": text, "logprobs": None, "finish_reason": None}


def _final(index: int, res: CompletionResult, chat: bool, logprobs: int | None,
           st: ServerState) -> dict[str, Any]:  # fmt: skip
    if chat:
        lp = {"content": _chat_logprobs(st, res.tokens, res.outputs)} if logprobs is not None \
            else None  # fmt: skip
        return {"index": index, "delta": {}, "logprobs": lp, "finish_reason": res.finish_reason}
    lp2 = _text_logprobs(st, res.tokens, res.outputs) if logprobs is not None else None
    return {"index": index, "text": "", "logprobs": lp2, "finish_reason": res.finish_reason}
