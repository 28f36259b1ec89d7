"""``SamplingStates`` in the engine: penalties equal a reference computed from the model's
own distribution, grammars constrain every sampled token, and a lost state ends its
generation."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

from loom.engine.batch import ForwardBatch, OutputSpec, SamplerSpec
from loom.engine.grammar import GrammarCompiler, GrammarError
from loom.engine.sampling_state import SamplingStates, StateSpec


@pytest.fixture(scope="module")
def engine(tiny_dir: Path) -> Any:
    from loom.config import EngineConfig
    from loom.engine.engine import Engine

    return Engine(EngineConfig(model=str(tiny_dir), num_pages=64))


def decode(engine: Any, prompt: list[int], steps: int, spec: Any) -> list[int]:
    """Feed ``prompt``, then ``steps`` tokens one pass each; ``spec(step)`` is the
    output spec of a step (at row 0); returns the sampled tokens."""
    ps = engine.pool.page_size
    pages = list(range(16))
    cur, pos, out = list(prompt), 0, []
    for step in range(steps):
        n = len(cur)
        kv = pos + n
        used = -(-kv // ps)
        batch = ForwardBatch(cur, list(range(pos, kv)), [0, n], [pages[:used]],
                             [kv - ps * (used - 1)], [spec(step, n - 1)])  # fmt: skip
        res = engine.execute(batch)[0]
        tok = res.token if res.token is not None else spec.pick(res)  # type: ignore[attr-defined]
        out.append(tok)
        pos, cur = kv, [tok]
    return out


def test_penalties_equal_a_reference_on_the_models_distribution(engine: Any) -> None:
    prompt = engine.tokenizer.encode("Once upon a time")
    presence, frequency, steps = 0.7, 1.3, 24
    engine.states.start(StateSpec(1, presence=presence, frequency=frequency))
    greedy = SamplerSpec(temperature=0.0)
    got = decode(engine, prompt, steps, lambda _s, i: OutputSpec(i, greedy, state=1))
    engine.states.end(1)

    # Reference: the full distribution each step (no state), penalized by hand.
    vocab = engine.model_config.vocab_size
    counts: dict[int, int] = {}

    class Ref:
        def __call__(self, _s: int, i: int) -> OutputSpec:
            return OutputSpec(i, None, top_k_dist=vocab)

        def pick(self, res: Any) -> int:
            logits = torch.full((vocab,), float("-inf"))
            logits[torch.tensor(res.top_ids)] = torch.tensor(res.top_probs).log()
            for t, c in counts.items():
                logits[t] -= presence + frequency * c
            tok = int(logits.argmax())
            counts[tok] = counts.get(tok, 0) + 1
            return tok

    want = decode(engine, prompt, steps, Ref())
    assert got == want
    plain = decode(engine, prompt, steps, lambda _s, i: OutputSpec(i, greedy))
    assert plain != got  # (the penalties change this greedy run: the check has teeth)


@pytest.mark.parametrize(
    "kind, source, language",
    [
        ("regex", r"[a-z]{2,4}-[0-9]{2}", r"[a-z]{2,4}-[0-9]{2}"),
        ("choice", ["red", "green", "blue sky"], r"red|green|blue sky"),
        ("lark", 'start: "(" NUM ("," NUM)* ")"\nNUM: /[0-9]{1,2}/', r"\(\d{1,2}(,\d{1,2})*\)"),
    ],
)
def test_grammars_constrain_every_sampled_token(
    engine: Any, kind: str, source: Any, language: str
) -> None:
    text = GrammarCompiler(engine.tokenizer, engine.model_config.vocab_size).compile(kind, source)
    eos = set(engine.tokenizer.eos_token_ids)
    prompt = engine.tokenizer.encode("Answer:")
    for seed in range(6):
        engine.states.start(StateSpec(100 + seed, text))
        sampler = SamplerSpec(temperature=1.0, seed=seed)
        toks = decode(engine, prompt, 40, lambda s, i: OutputSpec(i, sampler, state=100 + seed))  # noqa: B023
        engine.states.end(100 + seed)
        end = next((k for k, t in enumerate(toks) if t in eos), None)
        if kind == "lark" and end is None:
            continue  # (an unbounded list may not close within 40 tokens)
        assert end is not None, toks
        assert re.fullmatch(language, engine.tokenizer.decode(toks[:end])), toks


def test_a_lost_state_allows_only_end_of_sequence(engine: Any) -> None:
    vocab = engine.model_config.vocab_size
    states = SamplingStates(engine.tokenizer, vocab)
    logits = torch.randn(2, vocab)
    states.apply(logits, [(1, 12345)])  # never started
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert allowed == sorted(t for t in engine.tokenizer.eos_token_ids if t < vocab)
    assert torch.isfinite(logits[0]).all()  # other rows untouched


def test_bad_grammars_raise_with_the_reason(engine: Any) -> None:
    compiler = GrammarCompiler(engine.tokenizer, engine.model_config.vocab_size)
    with pytest.raises(GrammarError, match="strin"):
        compiler.compile("json_schema", {"type": "strin"})
    with pytest.raises(GrammarError):
        compiler.compile("lark", "start: missing")
    with pytest.raises(GrammarError, match="unknown constraint kind"):
        compiler.compile("yaml", "a: b")
    with pytest.raises(GrammarError, match="at most"):
        compiler.compile("regex", "a" * (300 * 1024))


def test_bitmasks_unpack_to_the_tokens_they_allow() -> None:
    from loom.engine.grammar import allowed

    words = torch.tensor([[5, -(2**31), 0], [-1, 1, 2**30]], dtype=torch.int32)
    got = allowed(words, 70)
    for r in range(2):
        want = [bool((int(words[r, t // 32]) >> (t % 32)) & 1) for t in range(70)]
        assert got[r].tolist() == want
