"""``GenerateTask`` (host generations: the OpenAI API, inferlets' ``generate``) stops
where the engine's offline path does: at the earliest stop string, whatever the list
order, with the streamed deltas adding up to the kept text."""

from __future__ import annotations

from pathlib import Path

import pytest

from loom.engine.batch import SamplerSpec
from loom.models.tokenizer import Tokenizer
from loom.runtime.generate_task import GenerateTask, StopConditions


@pytest.mark.parametrize("stops", [("ill", "the mill"), ("the mill", "ill")])
def test_the_earliest_stop_string_wins(tiny_dir: Path, stops: tuple[str, ...]) -> None:
    tok = Tokenizer.from_dir(tiny_dir)
    text = "Down by the river stood the mill, and the river ran on."
    ids = tok.encode(text, add_special_tokens=False)
    task = GenerateTask(pages=[], kv_len=0, pending=[1], position=0, sampler=SamplerSpec(),
                        stop=StopConditions(1000, frozenset(), stops), logit_mask=None,
                        stream=True, tokenizer=tok)  # fmt: skip
    streamed = ""
    for t in ids:
        streamed += task.on_token(t)
        if task.finish_reason is not None:
            break
    assert task.finish_reason == "stop"
    # Both complete with the token " mill"; "the mill" starts first.
    assert task.text == "Down by the river stood " == streamed


def test_streamed_pieces_always_add_up_to_the_kept_text(tiny_dir: Path) -> None:
    """Text that may start a stop string is held back until it cannot: whatever the
    stops, the pieces streamed equal the final text, cut where a full search would."""
    import random

    tok = Tokenizer.from_dir(tiny_dir)
    rng = random.Random(1)
    words = ["the", "river", "mill", "stood", "by", "old", "water", "wheel", "and", "ran"]
    for _ in range(40):
        text = " ".join(rng.choices(words, k=60))
        stops = tuple(" ".join(rng.choices(words, k=2))[: rng.randint(2, 9)] for _ in range(4))
        ids = tok.encode(text, add_special_tokens=False)
        task = GenerateTask(pages=[], kv_len=0, pending=[1], position=0, sampler=SamplerSpec(),
                            stop=StopConditions(len(ids), frozenset(), stops),
                            logit_mask=None, stream=True, tokenizer=tok)  # fmt: skip
        streamed = "".join(task.on_token(t) for t in ids if task.finish_reason is None)
        # Reference: after each token, search all the text so far; cut at the earliest.
        want = text
        for k in range(1, len(ids) + 1):
            so_far = tok.decode(ids[:k])
            hits = [i for i in (so_far.find(s) for s in stops) if i >= 0]
            if hits:
                want = so_far[: min(hits)]
                break
        assert task.text == want
        assert streamed == task.text
