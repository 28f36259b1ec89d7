"""OpenAI response bodies: choices, logprobs, usage, and the server-sent event stream.

Streamed choices carry each token's logprobs in the chunk of that token. A tool call the
output was constrained to (``tool_choice`` required or named) is not streamed as text: it
arrives whole, as one ``tool_calls`` delta, when the choice ends; with ``auto`` the text
streams and a call it turns out to be follows as that delta.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

from loom.engine.batch import OutputResult
from loom.runtime.completions import CompletionHandle, CompletionResult
from loom.server.state import ServerState
from loom.server.structured import constraint, tool_calls

Piece = tuple[str, int, OutputResult | None]  # a streamed token: text, id, its logprobs


class StreamedRun(Protocol):
    index: int
    pieces: asyncio.Queue[Piece | CompletionResult] | None
    handle: CompletionHandle


def account(st: ServerState, results: list[CompletionResult]) -> None:
    st.generated_tokens += sum(len(r.tokens) for r in results)
    st.prompt_tokens += sum(r.prompt_tokens for r in results)


def usage(results: list[CompletionResult], num_prompts: int, n: int) -> dict[str, Any]:
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


def choice(st: ServerState, body: Any, index: int, res: CompletionResult, chat: bool,
           logprobs: int | None) -> dict[str, Any]:  # fmt: skip
    """One choice of a whole (not streamed) response."""
    out: dict[str, Any] = {"index": index, "finish_reason": res.finish_reason}
    if chat:
        out["message"] = {"role": "assistant", "content": res.text}
        calls = tool_calls(res.text, body) if res.finish_reason == "stop" else None
        if calls:
            out["message"] = {"role": "assistant", "content": None, "tool_calls": calls}
            out["finish_reason"] = "tool_calls"
        out["logprobs"] = (
            {"content": chat_logprobs(st, res.tokens, res.outputs)} if logprobs is not None
            else None
        )  # fmt: skip
    else:
        out["text"] = res.text
        out["logprobs"] = (
            text_logprobs(st, res.tokens, res.outputs) if logprobs is not None else None
        )
    return out


def _piece(st: ServerState, token: int) -> str:
    return st.runtime.tokenizer.decode([token], skip_special_tokens=False)


def chat_logprobs(st: ServerState, tokens: list[int],
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


def text_logprobs(st: ServerState, tokens: list[int], outputs: list[OutputResult],
                  start: int = 0) -> dict[str, Any]:  # fmt: skip
    """``start``: the text offset of the first token (a streamed chunk's)."""
    texts = [_piece(st, t) for t in tokens]
    offsets, at = [], start
    for t in texts:
        offsets.append(at)
        at += len(t)
    return {
        "tokens": texts,
        "token_logprobs": [o.logprob for o in outputs],
        "top_logprobs": [{_piece(st, i): lp for i, lp in o.top_logprobs} for o in outputs],
        "text_offset": offsets,
    }


async def stream(st: ServerState, body: Any, runs: Sequence[StreamedRun], rid: str, created: int,
                 chat: bool, logprobs: int | None) -> AsyncIterator[str]:  # fmt: skip
    """The server-sent events of a streamed response, ``[DONE]`` last."""
    n = body.n
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    kind = "chat.completion.chunk" if chat else "text_completion"
    # A constrained tool call is held back and sent whole at the end.
    hold = chat and body.tools and body.tool_choice not in (None, "none", "auto")
    hold = bool(hold and constraint(body) is not None)

    def chunk(choices: list[dict[str, Any]], use: Any = None) -> str:
        frame: dict[str, Any] = {"id": rid, "object": kind, "created": created,
                                 "model": st.model_name, "choices": choices}  # fmt: skip
        if include_usage:
            frame["usage"] = use
        return f"data: {json.dumps(frame)}\n\n"

    finished: list[CompletionResult | None] = [None] * len(runs)
    position = {id(r): k for k, r in enumerate(runs)}  # (not ``runs.index`` per token)
    offsets = [0] * len(runs)
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
                k = position[id(run)]
                if isinstance(item, CompletionResult):
                    finished[k] = item
                    if item.error is not None:
                        err = {"error": {"message": f"generation failed: {item.error}",
                                         "type": "server_error"}}  # fmt: skip
                        yield f"data: {json.dumps(err)}\n\n"
                    calls = tool_calls(item.text, body) if chat and item.finish_reason == "stop" \
                        else None  # fmt: skip
                    if calls:
                        yield chunk([_calls_delta(run.index, calls)])
                    elif hold:  # (a call cut short by max_tokens: its text, as OpenAI does)
                        yield chunk([_delta(st, run.index, item.text, None, chat, 0)])
                    reason = "tool_calls" if calls else item.finish_reason
                    yield chunk([_final(run.index, reason, chat)])
                    continue
                text, token, out = item
                if not hold:
                    # One chunk per token, even when its text is held back (an incomplete
                    # character) or empty: clients time tokens by chunks.
                    lp = (token, out) if logprobs is not None and out is not None else None
                    yield chunk([_delta(st, run.index, text, lp, chat, offsets[k])])
                offsets[k] += len(text)
                pending[asyncio.ensure_future(_next(run))] = run
        results = [r for r in finished if r is not None]
        account(st, results)
        if include_usage:
            yield chunk([], usage(results, len(runs) // n, n))
        yield "data: [DONE]\n\n"
    finally:
        for r, res in zip(runs, finished, strict=True):
            if res is None:
                r.handle.cancel()  # the client disconnected mid-stream


async def _next(run: StreamedRun) -> Piece | CompletionResult:
    """The run's next streamed piece; its result comes last, after every piece."""
    assert run.pieces is not None
    return await run.pieces.get()


def _delta(st: ServerState, index: int, text: str, lp: tuple[int, OutputResult] | None,
           chat: bool, offset: int) -> dict[str, Any]:  # fmt: skip
    if chat:
        logprobs = {"content": chat_logprobs(st, [lp[0]], [lp[1]])} if lp else None
        return {"index": index, "delta": {"content": text}, "logprobs": logprobs,
                "finish_reason": None}  # fmt: skip
    logprobs = text_logprobs(st, [lp[0]], [lp[1]], offset) if lp else None
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": None}


def _calls_delta(index: int, calls: list[dict[str, Any]]) -> dict[str, Any]:
    deltas = [{"index": i, **c} for i, c in enumerate(calls)]
    return {"index": index, "delta": {"tool_calls": deltas}, "logprobs": None,
            "finish_reason": None}  # fmt: skip


def _final(index: int, reason: str, chat: bool) -> dict[str, Any]:
    if chat:
        return {"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}
    return {"index": index, "text": "", "logprobs": None, "finish_reason": reason}
