"""Structured chat output: ``response_format`` and ``tools`` as grammar constraints.

A JSON schema response format, or a tool call that is required or named, becomes a
constraint the host applies in every pass (``engine/grammar.py``); a tool call is
generated as ``{"name": ..., "arguments": {...}}`` (one of the offered functions, its
arguments valid under the function's ``parameters``) and answered as OpenAI answers:
``message.tool_calls`` with the arguments as JSON text, ``finish_reason: "tool_calls"``.
With ``tool_choice: "auto"`` the output is free and becomes a call only if it is one.

Transcripts with tool calls and tool results go to the chat template as transformers
passes them when the template handles tools; otherwise they are written as plain turns
(the calls as the JSON above, results as user turns) and the tools are described in a
system turn, so any template renders them.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from loom.api.errors import ApiError
from loom.api.openai_models import ChatCompletionRequest, NamedToolChoice, Tool
from loom.engine.grammar import GrammarError

COMPILE_TIMEOUT_S = 10.0


def constraint(body: ChatCompletionRequest) -> tuple[str, Any] | None:
    """(kind, source) of the grammar the request's output must follow, or None."""
    tools = body.tools or []
    choice = body.tool_choice
    if tools and (choice == "required" or isinstance(choice, NamedToolChoice)):
        only = choice.function.name if isinstance(choice, NamedToolChoice) else None
        return "json_schema", call_schema([t for t in tools if only in (None, t.function.name)])
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return "json_object", None
    assert fmt.json_schema is not None
    schema = fmt.json_schema.schema_
    return ("json_schema", schema) if schema else ("json_object", None)


def call_schema(tools: list[Tool]) -> dict[str, Any]:
    """A JSON schema whose instances are exactly the calls of ``tools``."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t.function.name},
                "arguments": t.function.parameters or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def compile_constraint(compile: Any, body: ChatCompletionRequest) -> str | None:
    """Checked grammar text for the request (``compile``: ``GrammarCompiler.compile``),
    or a 400 naming what is wrong with the schema or the tools."""
    for t in body.tools or []:  # every tool must be callable, whichever is chosen
        if t.function.parameters is not None:
            try:
                compile("json_schema", t.function.parameters)
            except GrammarError as e:
                raise ApiError(400, f"tools: function {t.function.name!r}: {e}",
                               param="tools") from None  # fmt: skip
    found = constraint(body)
    if found is None:
        return None
    kind, source = found
    param = "tools" if body.tool_choice not in (None, "none", "auto") else "response_format"
    try:
        return str(compile(kind, source))
    except GrammarError as e:
        raise ApiError(400, f"{param}: {e}", param=param) from None


async def compile_off_loop(compile: Any, body: ChatCompletionRequest) -> str | None:
    """``compile_constraint`` in a thread (llguidance releases the GIL while it builds
    a grammar), so a large grammar never stalls the server's other requests; one that
    takes longer than ``COMPILE_TIMEOUT_S`` is refused."""
    task = asyncio.to_thread(compile_constraint, compile, body)
    try:
        return await asyncio.wait_for(task, COMPILE_TIMEOUT_S)
    except TimeoutError:
        raise ApiError(400, f"the constraint took over {COMPILE_TIMEOUT_S:g} s to compile",
                       param="response_format") from None  # fmt: skip


def tool_calls(text: str, body: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    """The output as OpenAI ``tool_calls`` if it is a call of one of the tools."""
    if not body.tools or body.tool_choice == "none":
        return None
    try:
        call = json.loads(text)
    except ValueError:
        return None
    names = {t.function.name for t in body.tools}
    if (
        not isinstance(call, dict)
        or call.get("name") not in names
        or not isinstance(call.get("arguments"), dict)
    ):
        return None
    return [
        {
            "id": "call_" + uuid.uuid4().hex[:24],
            "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])},
        }
    ]


def template_messages(
    body: ChatCompletionRequest, template: str | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) for the chat template: as transformers passes them when the
    template knows the role or tools, else rewritten as plain turns any template takes."""
    source = template or ""
    knows_tools = "tool" in source
    messages: list[dict[str, Any]] = []
    for m in body.messages:
        role = m.role
        if role == "developer" and "developer" not in source:
            role = "system"
        msg: dict[str, Any] = {"role": role, "content": m.text()}
        if m.tool_calls:
            calls = [
                {"name": c.function.name, "arguments": _arguments(c.function.arguments)}
                for c in m.tool_calls
            ]
            if knows_tools:
                pairs = zip(m.tool_calls, calls, strict=True)
                msg["tool_calls"] = [
                    {"id": c.id, "type": "function", "function": call} for c, call in pairs
                ]
                msg["content"] = m.text() or None
            else:
                msg["content"] = "\n".join(json.dumps(c) for c in calls)
        if role == "tool":
            if knows_tools:
                msg["tool_call_id"] = m.tool_call_id
            else:
                msg = {"role": "user", "content": f"Tool result ({m.tool_call_id}): {m.text()}"}
        messages.append(msg)
    tools = body.tools if body.tool_choice != "none" else None
    if not tools:
        return messages, None
    specs = [t.model_dump(exclude_none=True) for t in tools]
    if knows_tools:
        return messages, specs
    described = _describe(tools)
    if messages[0]["role"] == "system":
        messages[0] = {**messages[0], "content": messages[0]["content"] + "\n\n" + described}
    else:
        messages.insert(0, {"role": "system", "content": described})
    return messages, None


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise ApiError(400, "messages: a tool call's arguments are not JSON",
                       param="messages") from None  # fmt: skip


def _describe(tools: list[Tool]) -> str:
    lines = ["You can call these functions. To call one, answer with only "
             '{"name": <function name>, "arguments": <arguments object>}.']  # fmt: skip
    for t in tools:
        f = t.function
        params = json.dumps(f.parameters or {"type": "object"})
        lines.append(f"- {f.name}: {f.description or ''} Parameters: {params}")
    return "\n".join(lines)
