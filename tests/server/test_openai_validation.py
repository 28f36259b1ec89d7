"""Schema-driven bad input: for every field of the OpenAPI request schemas, values the
schema forbids (wrong types, out of bounds) must get a 400 naming the field, and the server
must keep serving."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.server.conftest import API_KEY

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = spec["components"]["schemas"][name]
    return schema


def _variants(spec: dict[str, Any], schema: dict[str, Any]) -> list[dict[str, Any]]:
    schema = _resolve(spec, schema)
    if "anyOf" in schema:
        return [v for s in schema["anyOf"] for v in _variants(spec, s)]
    return [schema]


def invalid_values(spec: dict[str, Any], schema: dict[str, Any]) -> list[Any]:
    """Values no variant of ``schema`` accepts."""
    variants = _variants(spec, schema)
    types = {v.get("type") for v in variants}
    out: list[Any] = [[1, 2]] if "object" in types else [{"bogus": [1]}]
    numeric = [v for v in variants if v.get("type") in ("integer", "number")]
    if len(numeric) == 1 and len(variants) <= 2:  # a number (or null): test its bounds
        v = numeric[0]
        step = 1 if v["type"] == "integer" else 0.5
        if "minimum" in v:
            out.append(v["minimum"] - step)
        if "exclusiveMinimum" in v:
            out.append(v["exclusiveMinimum"])
        if "maximum" in v:
            out.append(v["maximum"] + step)
        if "exclusiveMaximum" in v:
            out.append(v["exclusiveMaximum"])
    return out


def cases(spec: dict[str, Any], schema_name: str, base: dict[str, Any]) -> list[tuple[str, Any]]:
    schema = spec["components"]["schemas"][schema_name]
    out = []
    for name, prop in schema["properties"].items():
        out += [(name, value) for value in invalid_values(spec, prop)]
    return out


@pytest.fixture(scope="module")
def spec(server: Any) -> dict[str, Any]:
    return httpx.get(server.url + "/openapi.json").json()  # type: ignore[no-any-return]


def _bases(model: str) -> dict[str, tuple[str, str, dict[str, Any]]]:
    return {
        "completions": ("/v1/completions", "CompletionRequest",
                        {"model": model, "prompt": "hello", "max_tokens": 2}),
        "chat": ("/v1/chat/completions", "ChatCompletionRequest",
                 {"model": model, "messages": [{"role": "user", "content": "hi"}],
                  "max_tokens": 2}),
    }  # fmt: skip


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_every_field_rejects_what_its_schema_forbids(
    server: Any, spec: dict[str, Any], model_name: str, endpoint: str
) -> None:
    path, schema_name, base = _bases(model_name)[endpoint]
    ok = httpx.post(server.url + path, json=base, headers=HEADERS)
    assert ok.status_code == 200, ok.text
    checked = set()
    for name, value in cases(spec, schema_name, base):
        r = httpx.post(server.url + path, json={**base, name: value}, headers=HEADERS)
        assert r.status_code == 400, (name, value, r.status_code, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error"
        assert name in err["message"], (name, err)
        checked.add(name)
    assert checked == set(spec["components"]["schemas"][schema_name]["properties"])
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


BAD_BODIES: list[tuple[str, Any]] = [
    ("/v1/completions", {"prompt": "no model"}),
    ("/v1/completions", {"model": "M", "prompt": "x", "unknown_field": 1}),
    ("/v1/completions", {"model": "M", "prompt": []}),
    ("/v1/completions", {"model": "M", "prompt": [[1, 2], []]}),
    ("/v1/completions", {"model": "M", "prompt": [10**9]}),
    ("/v1/completions", {"model": "M", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}),
    ("/v1/completions", {"model": "M", "prompt": "x", "presence_penalty": 2.5}),
    ("/v1/completions", {"model": "M", "prompt": "x", "logit_bias": {"7": 500}}),
    ("/v1/completions", {"model": "M", "prompt": "x", "logit_bias": {"word": 1}}),
    ("/v1/completions", {"model": "M", "prompt": "x", "echo": True}),
    ("/v1/completions", {"model": "M", "prompt": "x", "stream_options": {"include_usage": True}}),
    ("/v1/chat/completions", {"model": "M", "messages": []}),
    ("/v1/chat/completions", {"model": "M", "messages": [{"role": "wizard", "content": "x"}]}),
    ("/v1/chat/completions", {"model": "M", "messages": [{"content": "x"}]}),
    ("/v1/chat/completions", {"model": "M", "messages": "hi"}),
    ("/v1/chat/completions",
     {"model": "M", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}),
    ("/v1/chat/completions",
     {"model": "M", "messages": [{"role": "user", "content": "x"}],
      "response_format": {"type": "yaml"}}),
    ("/v1/inferlets/run", {"program": "not-a-hash"}),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body"), BAD_BODIES)
def test_bad_bodies_get_a_clear_400(server: Any, model_name: str, path: str, body: Any) -> None:
    if isinstance(body, dict) and body.get("model") == "M":
        body = {**body, "model": model_name}
    r = httpx.post(server.url + path, json=body, headers=HEADERS)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"]


def test_non_json_bodies_get_a_400(server: Any) -> None:
    for content in (b"{not json", b"[1, 2]", b"\xff\xfe", b""):
        r = httpx.post(server.url + "/v1/completions", content=content,
                       headers={**HEADERS, "Content-Type": "application/json"})  # fmt: skip
        assert r.status_code == 400, (content, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"


def test_a_prompt_longer_than_the_context_is_refused(server: Any, model_name: str) -> None:
    n = server.state.runtime.max_model_len
    r = httpx.post(server.url + "/v1/completions", headers=HEADERS,
                   json={"model": model_name, "prompt": [5] * n})  # fmt: skip
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]
