"""Output validation: each candidate's token log-probabilities equal a transformers
reference on the same weights, and the most likely candidate wins."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tests.inferlets.conftest import program, reply
from tests.runtime_helpers import free_pages


def _reference(model_dir: Path, prompt: list[int], cont: list[int]) -> list[float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    ids = torch.tensor([prompt + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    rows = range(len(prompt) - 1, len(prompt) + len(cont) - 1)
    return [float(logp[r, t]) for r, t in zip(rows, cont, strict=True)]


def test_candidates_score_as_the_reference_and_the_likeliest_wins(irt: Any, tiny_dir: Path) -> None:
    prog = program(irt, "output_validation")
    free0 = free_pages(irt)
    # A prompt of whole pages and one that is not: the last prompt token is re-fed either way.
    for prompt in ("Once upon a time there was a", "The mill stood by the river and"):
        candidates = [" little robot", " big old tower by the sea", " mill"]
        got = json.loads(reply(irt, prog, prompt, *candidates))
        tok = irt.tokenizer
        p_ids = tok.encode(prompt, add_special_tokens=False)
        means = []
        for cand, score in zip(candidates, got["scores"], strict=True):
            want = _reference(tiny_dir, p_ids, tok.encode(cand, add_special_tokens=False))
            assert score["candidate"] == cand
            assert all(abs(a - b) < 1e-3 for a, b in zip(score["logprobs"], want, strict=True)), (
                score["logprobs"],
                want,
            )
            means.append(sum(want) / len(want))
        assert got["best"] == candidates[max(range(len(means)), key=means.__getitem__)]
    assert free_pages(irt) == free0
