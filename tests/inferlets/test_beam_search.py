"""Beam search returns the beams of best total log-probability: with a beam as wide as
the tree (a 3-token vocabulary, 3 steps) it equals exhaustive search, scored by a
transformers reference on the same weights."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import torch

from tests.inferlets.conftest import program, reply
from tests.runtime_helpers import free_pages

ALLOWED = [101, 202, 303]


def _exhaustive(model_dir: Path, prompt: list[int], steps: int) -> list[tuple[list[int], float]]:
    """Every continuation over ALLOWED with its total log-probability, best first."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    seqs = [list(s) for s in itertools.product(ALLOWED, repeat=steps)]
    ids = torch.tensor([prompt + s for s in seqs])  # [27, len(prompt) + steps]
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.float(), dim=-1)
    rows = range(len(prompt) - 1, len(prompt) + steps - 1)
    scored = [
        (s, sum(float(logp[b, r, t]) for r, t in zip(rows, s, strict=True)))
        for b, s in enumerate(seqs)
    ]
    return sorted(scored, key=lambda x: -x[1])


def test_a_full_width_beam_equals_exhaustive_search(irt: Any, tiny_dir: Path) -> None:
    prog = program(irt, "beam_search")
    free0 = free_pages(irt)
    prompt = "The old mill by the river"
    p_ids = irt.tokenizer.encode(prompt, add_special_tokens=False)
    want = _exhaustive(tiny_dir, p_ids, 3)
    start = irt.query(lambda: len(irt.stats.batch_sizes))
    got = json.loads(reply(irt, prog, prompt, "9", "3", json.dumps(ALLOWED)))["beams"]
    assert [b["tokens"] for b in got] == [s for s, _ in want[:9]]
    assert all(abs(b["logprob"] - lp) < 1e-3 for b, (_, lp) in zip(got, want, strict=False))
    # Step t asks all 3**t beams in one pass: the widest pass holds all nine.
    sizes = irt.query(lambda: list(irt.stats.batch_sizes)[start:])
    assert max(sizes) >= 9
    assert free_pages(irt) == free0


def test_a_narrow_beam_keeps_its_best_and_scores_truly(irt: Any, tiny_dir: Path) -> None:
    prog = program(irt, "beam_search")
    prompt = "Once upon a time"
    p_ids = irt.tokenizer.encode(prompt, add_special_tokens=False)
    every = dict((tuple(s), lp) for s, lp in _exhaustive(tiny_dir, p_ids, 3))
    got = json.loads(reply(irt, prog, prompt, "2", "3", json.dumps(ALLOWED)))["beams"]
    assert len(got) == 2 and got[0]["logprob"] >= got[1]["logprob"]
    for b in got:  # each beam's score is its true total log-probability
        assert abs(b["logprob"] - every[tuple(b["tokens"])]) < 1e-3
    # Beam search can miss the optimum, never beat it.
    assert got[0]["logprob"] <= max(every.values()) + 1e-6
