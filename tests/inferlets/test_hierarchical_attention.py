"""Hierarchical attention: sections the 2-D mask separates do not influence each other
(their next-token distributions are unchanged when a sibling's text changes), while a
section still reads its ancestors (they change when the parent's text does)."""

from __future__ import annotations

import json
from typing import Any

from tests.inferlets.conftest import program, reply
from tests.runtime_helpers import free_pages


def _doc(root: str, a: str, a1: str, b: str) -> str:
    doc = {"text": root, "children": [{"text": a, "children": [{"text": a1}]}, {"text": b}]}
    return json.dumps({"doc": doc, "k": 16, "max_tokens": 4})


def _dists(got: dict[str, Any]) -> dict[tuple[int, ...], list[list[float]]]:
    return {tuple(s["path"]): s["next"] for s in got["sections"]}


def _same(x: list[list[float]], y: list[list[float]]) -> bool:
    return [t for t, _ in x] == [t for t, _ in y] and all(
        abs(p - q) < 1e-5 for (_, p), (_, q) in zip(x, y, strict=True)
    )


def test_separated_sections_do_not_see_each_other(irt: Any) -> None:
    prog = program(irt, "hierarchical_attention")
    free0 = free_pages(irt)
    tok = irt.tokenizer
    root, a1 = "Catalog of the mill library.", " A.1: millstones"
    a = " Section A: grain and stones."
    b, b2 = " Section B: the river wheel.", " Section B: the river gate."
    a2 = " Section A: flour and stones"

    def n(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=False))

    # Same lengths: a changed sibling moves no later section's positions.
    assert n(b) == n(b2) and n(a) == n(a2)
    base = _dists(json.loads(reply(irt, prog, _doc(root, a, a1, b))))
    other_b = _dists(json.loads(reply(irt, prog, _doc(root, a, a1, b2))))
    other_a = _dists(json.loads(reply(irt, prog, _doc(root, a2, a1, b))))
    assert list(base) == [(), (0,), (0, 0), (1,)]
    # B changed: A and its subsection A.1 read the same (B comes later; masking is moot
    # for them, this checks the positions and the pass), and the root too.
    for path in [(), (0,), (0, 0)]:
        assert _same(base[path], other_b[path])
    assert not _same(base[(1,)], other_b[(1,)])
    # A changed: B, which comes after A in the document, is unaffected: the mask hides A.
    assert _same(base[(1,)], other_a[(1,)])
    # ...while A.1, whose parent A is, reads it.
    assert not _same(base[(0, 0)], other_a[(0, 0)])
    assert free_pages(irt) == free0


def test_causal_sections_would_see_each_other(irt: Any) -> None:
    """The control: the same texts as one flat section list under a causal mask (B is A's
    child here), so a change in A reaches B: the invariance above is the mask's doing."""
    prog = program(irt, "hierarchical_attention")

    def flat(a: str) -> str:
        b = {"text": " Section B: the river wheel."}
        doc = {"text": "Catalog of the mill library.", "children": [{"text": a, "children": [b]}]}
        return json.dumps({"doc": doc, "k": 16, "max_tokens": 2})

    x = _dists(json.loads(reply(irt, prog, flat(" Section A: grain and stones."))))
    y = _dists(json.loads(reply(irt, prog, flat(" Section A: flour and stones"))))
    assert not _same(x[(0, 0)], y[(0, 0)])
