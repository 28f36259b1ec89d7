"""``constrained_decoding``: with random weights, every output obeys its constraint — a
JSON schema, a regex, a Lark grammar, a choice — on the host fast path and in a guest
decode loop (which agree token for token under greedy sampling), and forks finish a
shared partial output under the same grammar."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest

from tests.inferlets.conftest import program, reply

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 999},
        "kind": {"enum": ["cat", "dog"]},
        "names": {
            "type": "array",
            "items": {"type": "string", "maxLength": 6},
            "minItems": 1,
            "maxItems": 3,
        },
        "owner": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}, "vip": {"type": "boolean"}},
            "required": ["city", "vip"],
            "additionalProperties": False,
        },
    },
    "required": ["id", "kind", "names", "owner"],
    "additionalProperties": False,
}
LARK = r"""
start: greeting " " name "!" tail?
greeting: "hello" | "hi" | "hey"
name: /[A-Z][a-z]{1,6}/
tail: " x" NUMBER
NUMBER: /[0-9]{1,3}/
"""
LARK_LANGUAGE = re.compile(r"(hello|hi|hey) [A-Z][a-z]{1,6}!( x[0-9]{1,3})?")


def run(irt: Any, prog: str, **cfg: Any) -> dict[str, Any]:
    return json.loads(reply(irt, prog, json.dumps(cfg)))  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def prog(irt: Any) -> str:
    return program(irt, "constrained_decoding")


@pytest.mark.parametrize("mode", ["generate", "steps"])
def test_json_schema_outputs_validate_over_many_seeds(irt: Any, prog: str, mode: str) -> None:
    outputs = []
    for seed in (0, 100):
        got = run(irt, prog, schema=SCHEMA, samples=6, seed=seed, max_tokens=200, mode=mode)
        outputs += got["outputs"]
    for out in outputs:
        assert out["finish_reason"] == "stop", out
        jsonschema.validate(json.loads(out["text"]), SCHEMA)
    assert len({o["text"] for o in outputs}) > 6


def test_regex_lark_and_choice_constraints_hold(irt: Any, prog: str) -> None:
    pattern = r"[a-z]{2,5}-[0-9]{1,3}"
    got = run(irt, prog, regex=pattern, samples=8, seed=1, max_tokens=40)
    for out in got["outputs"]:
        assert re.fullmatch(pattern, out["text"]), out
    got = run(irt, prog, lark=LARK, samples=8, seed=2, max_tokens=40)
    for out in got["outputs"]:
        assert LARK_LANGUAGE.fullmatch(out["text"]), out
    options = ["yes", "no", "maybe later"]
    got = run(irt, prog, choice=options, samples=8, seed=3, max_tokens=20)
    assert {o["text"] for o in got["outputs"]} <= set(options)


def test_the_host_fast_path_and_a_guest_decode_loop_agree(irt: Any, prog: str) -> None:
    """Greedy: the worker's matcher (masking every step itself) and the guest's matcher
    (its mask sent with each pass) must choose the same tokens."""
    fast = run(irt, prog, schema=SCHEMA, samples=1, temperature=0, max_tokens=120)
    steps = run(irt, prog, schema=SCHEMA, samples=1, temperature=0, max_tokens=120, mode="steps")
    assert fast["outputs"] == steps["outputs"]
    jsonschema.validate(json.loads(fast["outputs"][0]["text"]), SCHEMA)


@pytest.mark.parametrize("mode", ["generate", "steps"])
def test_forks_finish_a_shared_partial_output_under_the_same_grammar(
    irt: Any, prog: str, mode: str
) -> None:
    got = run(irt, prog, schema=SCHEMA, samples=4, seed=7, fork_after=6, max_tokens=200,
              mode=mode)  # fmt: skip
    prefix = got["prefix"]
    assert prefix.startswith("{") and len(prefix) > 1
    for out in got["outputs"]:
        assert out["text"].startswith(prefix)
        jsonschema.validate(json.loads(out["text"]), SCHEMA)


def test_a_bad_constraint_fails_with_the_compilers_reason(irt: Any, prog: str) -> None:
    from tests.runtime_helpers import run_inferlet

    result, _ = run_inferlet(irt, prog, json.dumps({"lark": "start: undefined_rule"}))
    assert not result.ok and "lark" in (result.error or "")
    result, _ = run_inferlet(irt, prog, json.dumps({"regex": "(unclosed"}))
    assert not result.ok and "regex" in (result.error or "")
