"""Attention sink and windowed attention: over a 2,000-token generation the KV stays
bounded, and what the model predicts equals a reference that keeps every page and hides
the same tokens with the attention mask (correctness, not only boundedness)."""

from __future__ import annotations

import json
from typing import Any

from tests.inferlets.conftest import program, reply
from tests.runtime_helpers import free_pages

STEPS = 2000


def test_an_attention_sink_stays_bounded_and_equals_the_masked_reference(irt: Any) -> None:
    prog = program(irt, "attention_sink")
    free0 = free_pages(irt)
    args = ["Once upon a time", str(STEPS), "4", "64"]
    dropped = json.loads(reply(irt, prog, *args, "drop", "250"))
    masked = json.loads(reply(irt, prog, *args, "mask", "250"))
    ps = irt.page_size
    assert dropped["tokens"] == masked["tokens"] > STEPS
    # The sink's page, the window (64 tokens, whole pages hidden: up to a page more) and
    # the page being written.
    assert dropped["most_pages"] <= 1 + 64 // ps + 2 and dropped["dropped"] > 100
    assert masked["most_pages"] > STEPS // ps and masked["dropped"] == 0
    assert len(dropped["dists"]) == len(masked["dists"]) == STEPS // 250
    for (ids_a, probs_a), (ids_b, probs_b) in zip(dropped["dists"], masked["dists"], strict=True):
        assert ids_a[:3] == ids_b[:3]
        assert all(abs(a - b) < 1e-4 for a, b in zip(probs_a, probs_b, strict=True))
    assert free_pages(irt) == free0


def test_windowed_attention_stays_bounded_with_the_masked_references_text(irt: Any) -> None:
    prog = program(irt, "windowed_attention")
    dropped = json.loads(reply(irt, prog, "Once upon a time", str(STEPS), "128", "drop"))
    masked = json.loads(reply(irt, prog, "Once upon a time", str(STEPS), "128", "mask"))
    assert dropped["most_pages"] <= 128 // irt.page_size + 2 < masked["most_pages"]
    assert dropped["text"] == masked["text"]  # greedy under the same mask
