"""Structured output through the OpenAI API with the official client: JSON schemas,
the ``parse`` helper, tool calls (streamed and not), logit bias, streamed logprobs, and
clear 400s for bad constraints. Random weights: only the constraint makes output parse."""

from __future__ import annotations

import json
from typing import Any, Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.server.conftest import API_KEY

# Nesting, enums, arrays, required and optional fields, bounded so random weights finish.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {
            "type": "array",
            "items": {"type": "string", "maxLength": 6},
            "minItems": 1,
            "maxItems": 3,
        },
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                    "qty": {"type": "integer", "minimum": 1, "maximum": 9},
                },
                "required": ["sku", "qty"],
                "additionalProperties": False,
            },
            "minItems": 1,
            "maxItems": 2,
        },
        "priority": {"enum": ["low", "high"]},
        "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 8}]},
    },
    "required": ["items", "priority", "note"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["c", "f"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "minimum": -99, "maximum": 99},
                "b": {"type": "integer", "minimum": -99, "maximum": 99},
            },
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
USER = [{"role": "user", "content": "Answer please."}]


@pytest.fixture(scope="module")
def client(server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


def schema_format(schema: dict[str, Any]) -> Any:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}


@pytest.mark.parametrize("schema", [PERSON, ORDER], ids=["person", "order"])
def test_every_constrained_output_validates_over_many_seeds(
    client: openai.OpenAI, model_name: str, schema: dict[str, Any]
) -> None:
    texts = []
    for seed in range(12):
        r = client.chat.completions.create(
            model=model_name, messages=USER, response_format=schema_format(schema),  # type: ignore[arg-type]
            seed=seed, max_tokens=300,
        )  # fmt: skip
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        value = json.loads(choice.message.content or "")
        jsonschema.validate(value, schema)
        texts.append(choice.message.content)
    assert len(set(texts)) > 6  # sampled, not one forced string


def test_json_object_mode_gives_a_json_object(client: openai.OpenAI, model_name: str) -> None:
    done = 0
    for seed in range(8):
        r = client.chat.completions.create(
            model=model_name, messages=USER, response_format={"type": "json_object"},
            seed=seed, max_tokens=200, temperature=0.7,
        )  # fmt: skip
        c = r.choices[0]
        text = c.message.content or ""
        assert text.startswith("{")
        if c.finish_reason == "stop":  # (an unbounded object may run out of tokens)
            assert isinstance(json.loads(text), dict)
            done += 1
    assert done >= 1


class Ticket(BaseModel):
    title: str = Field(max_length=10)
    severity: Literal["low", "high"]
    votes: int = Field(ge=0, le=50)


def test_the_official_parse_helper_returns_a_parsed_object(
    client: openai.OpenAI, model_name: str
) -> None:
    for seed in range(3):
        r = client.chat.completions.parse(
            model=model_name, messages=USER, response_format=Ticket, seed=seed, max_tokens=200
        )  # type: ignore[call-overload]
        parsed = r.choices[0].message.parsed
        assert isinstance(parsed, Ticket)
        assert 0 <= parsed.votes <= 50 and len(parsed.title) <= 10


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_tool_calling_round_trip(client: openai.OpenAI, model_name: str, stream: bool) -> None:
    tools: Any = [WEATHER, ADD]
    messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    kwargs = dict(model=model_name, tools=tools, max_tokens=120, seed=3)
    call: Any
    if stream:
        chunks = list(client.chat.completions.create(
            messages=messages, tool_choice="required", stream=True, **kwargs))  # type: ignore[call-overload]  # fmt: skip
        deltas = [d for ch in chunks for d in (ch.choices[0].delta.tool_calls or [])]
        assert len(deltas) == 1 and deltas[0].id and deltas[0].function
        assert not any(ch.choices[0].delta.content for ch in chunks)
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        fn = deltas[0].function
        call = {"id": deltas[0].id, "type": "function",
                "function": {"name": fn.name, "arguments": fn.arguments}}  # fmt: skip
    else:
        r = client.chat.completions.create(messages=messages, tool_choice="required", **kwargs)  # type: ignore[call-overload]
        assert r.choices[0].finish_reason == "tool_calls"
        assert r.choices[0].message.content is None
        (tc,) = r.choices[0].message.tool_calls
        call = tc.model_dump()
    name, args = call["function"]["name"], json.loads(call["function"]["arguments"])
    schema = {"get_weather": WEATHER, "add": ADD}[name]["function"]["parameters"]  # type: ignore[index]
    jsonschema.validate(args, schema)
    # The call and its result go back in the transcript; the answer is text.
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 21 C"},
    ]
    r2 = client.chat.completions.create(messages=messages, tool_choice="none", **kwargs)  # type: ignore[call-overload]
    assert r2.choices[0].finish_reason in ("stop", "length")
    assert r2.choices[0].message.tool_calls is None and r2.choices[0].message.content


def test_a_named_tool_choice_calls_that_function(client: openai.OpenAI, model_name: str) -> None:
    for seed in range(4):
        r = client.chat.completions.create(
            model=model_name, messages=USER, tools=[WEATHER, ADD], seed=seed, max_tokens=80,  # type: ignore[list-item]
            tool_choice={"type": "function", "function": {"name": "add"}},
        )  # fmt: skip
        (tc,) = r.choices[0].message.tool_calls or []
        assert tc.function.name == "add"  # type: ignore[union-attr]
        jsonschema.validate(json.loads(tc.function.arguments), ADD["function"]["parameters"])  # type: ignore[union-attr,index]


def test_logit_bias_forces_a_token(client: openai.OpenAI, model_name: str, server: Any) -> None:
    tok = server.state.runtime.tokenizer
    target = tok.encode(" blue", add_special_tokens=False)[0]
    r = client.completions.create(model=model_name, prompt="Once upon a time", max_tokens=5,
                                  temperature=0, logit_bias={str(target): 100})  # fmt: skip
    assert r.choices[0].text == tok.decode([target] * 5)
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(model=model_name, prompt="x", logit_bias={"99999999": 1})


def test_streamed_logprobs_come_with_each_chunk(client: openai.OpenAI, model_name: str) -> None:
    whole = client.chat.completions.create(
        model=model_name, messages=USER, max_tokens=6, temperature=0, logprobs=True,
        top_logprobs=2)  # fmt: skip
    chunks = list(client.chat.completions.create(
        model=model_name, messages=USER, max_tokens=6, temperature=0, logprobs=True,
        top_logprobs=2, stream=True))  # fmt: skip
    per_chunk = [ch.choices[0].logprobs.content for ch in chunks
                 if ch.choices and ch.choices[0].logprobs is not None]  # fmt: skip
    assert all(len(c or []) == 1 for c in per_chunk)
    want = [e.logprob for e in whole.choices[0].logprobs.content or []]  # type: ignore[union-attr]
    assert [c[0].logprob for c in per_chunk if c] == pytest.approx(want, abs=1e-4)


def test_model_by_id_and_the_developer_role(client: openai.OpenAI, model_name: str) -> None:
    assert client.models.retrieve(model_name).id == model_name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    r = client.chat.completions.create(
        model=model_name, max_tokens=3,
        messages=[{"role": "developer", "content": "Be brief."}, *USER],  # type: ignore[list-item]
    )  # fmt: skip
    assert r.choices[0].message.content is not None


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"response_format": schema_format({"properties": {"a": {"type": "strin"}}})},
         "response_format"),
        ({"response_format": schema_format({"type": "string", "pattern": "(unclosed"})},
         "response_format"),
        ({"response_format": {"type": "json_schema"}}, "json_schema"),
        ({"tools": [{"type": "function", "function": {"name": "f",
                                                      "parameters": {"type": 7}}}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "name"),
        ({"tools": [WEATHER, WEATHER]}, "unique"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "nope"),
        ({"tool_choice": "required"}, "tool_choice needs tools"),
    ],
    ids=["bad-type", "bad-pattern", "no-schema", "bad-parameters", "bad-name", "duplicate",
         "unknown-function", "no-tools"],
)  # fmt: skip
def test_bad_constraints_get_a_clear_400_and_the_server_stays_up(
    client: openai.OpenAI, model_name: str, extra: dict[str, Any], match: str
) -> None:
    with pytest.raises(openai.BadRequestError, match=match):
        client.chat.completions.create(model=model_name, messages=USER, max_tokens=4, **extra)  # type: ignore[call-overload]
    r = client.chat.completions.create(model=model_name, messages=USER, max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_a_huge_schema_is_refused_quickly(client: openai.OpenAI, model_name: str) -> None:
    import time

    props = {f"field_{i}": {"type": "string", "pattern": "^[a-z]{3,40}$"} for i in range(9000)}
    t = time.perf_counter()
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(
            model=model_name, messages=USER, max_tokens=4,
            response_format=schema_format({"type": "object", "properties": props}),  # type: ignore[arg-type]
        )  # fmt: skip
    assert time.perf_counter() - t < 10


def test_presence_and_frequency_penalties_apply_streamed_or_not(
    client: openai.OpenAI, model_name: str
) -> None:
    kw: Any = dict(model=model_name, prompt="Once upon a time", max_tokens=40, temperature=0,
                   extra_body={"ignore_eos": True})  # fmt: skip
    plain = client.completions.create(**kw).choices[0].text
    penal = client.completions.create(presence_penalty=1.5, frequency_penalty=2.0, **kw)
    chunks = client.completions.create(presence_penalty=1.5, frequency_penalty=2.0,
                                       stream=True, **kw)  # fmt: skip
    streamed = "".join(c.choices[0].text for c in chunks)
    assert penal.choices[0].text != plain
    assert streamed == penal.choices[0].text  # (worker chunks and runtime steps agree)


def test_the_served_model_name_is_the_one_clients_use(tiny_dir: Any, tmp_path: Any) -> None:
    from loom.config import ServeConfig
    from loom.server.app import BackgroundServer

    settings = ServeConfig.of(model=str(tiny_dir), port=0, worker="thread", num_pages=64,
                             served_model_name="my-llm", program_dir=str(tmp_path))  # fmt: skip
    with BackgroundServer(settings) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in c.models.list()] == ["my-llm"]
        assert c.completions.create(model="my-llm", prompt="Hi", max_tokens=2).model == "my-llm"


def test_a_grammar_holds_against_a_logit_bias_and_penalties(
    client: openai.OpenAI, model_name: str, server: Any
) -> None:
    """Bias and penalties shape the distribution; the grammar still decides what may
    come: under a +100 bias on one token every output still validates."""
    banned = server.state.runtime.tokenizer.encode(" blue", add_special_tokens=False)[0]
    for seed in range(4):
        r = client.chat.completions.create(
            model=model_name, messages=USER, response_format=schema_format(ORDER),  # type: ignore[arg-type]
            seed=seed, max_tokens=300, logit_bias={str(banned): 100}, frequency_penalty=1.0,
        )  # fmt: skip
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content or ""), ORDER)
