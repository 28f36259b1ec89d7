"""Watermarking: a green-list logit bias (applied by the host's generate loop) that a
z-score test finds in marked text and not in unmarked text, over 100 samples each."""

from __future__ import annotations

import json
from typing import Any

from tests.inferlets.conftest import program, reply
from tests.runtime_helpers import free_pages


def test_the_detector_finds_the_mark_and_only_the_mark(irt: Any) -> None:
    prog = program(irt, "watermarking")
    free0 = free_pages(irt)
    got = json.loads(reply(irt, prog, json.dumps({"samples": 100, "tokens": 64, "batch": 25})))
    marked, unmarked = got["marked"], got["unmarked"]
    assert len(marked) == len(unmarked) == 100
    print(f"detection rate {got['detection_rate']:.2f}, "
          f"false positives {got['false_positive_rate']:.2f}")  # fmt: skip
    assert got["detection_rate"] >= 0.95
    assert got["false_positive_rate"] <= 0.02
    # Unmarked text is about half green (z near 0), marked text far more.
    assert abs(sum(unmarked) / 100) < 1.0 < 4.0 < sum(marked) / 100
    # The detector alone, on given tokens: a marked key's test of unrelated ids (a
    # counting sequence) finds nothing.
    detect = json.loads(reply(irt, prog, json.dumps({"detect": list(range(200, 328))})))
    assert abs(detect["z"]) < 4.0
    assert free_pages(irt) == free0
