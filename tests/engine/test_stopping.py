"""One stop path: the earliest stop string wins whatever the list order, matches that
span token boundaries are found, and long outputs with many stop strings cut exactly
where a full search would."""

from __future__ import annotations

import random

from loom.engine.stopping import find_stop, new_token_budget


def feed(pieces: list[str], stops: list[str]) -> str | None:
    """Text as a generation would keep it: pieces appended, searched as they come, cut at
    the first stop found; None if no stop string ever appears."""
    text = ""
    for piece in pieces:
        before = len(text)
        text += piece
        cut = find_stop(text, before, stops)
        if cut >= 0:
            return text[:cut]
    return None


def test_the_earliest_match_wins_whatever_the_order() -> None:
    for stops in (["world", "lo w"], ["lo w", "world"]):
        assert feed(["hello world"], stops) == "hel"
    assert feed(["he", "llo", " wo", "rld"], ["world", "o w"]) == "hell"


def test_matches_across_pieces_and_at_the_start() -> None:
    assert feed(["ab", "c", "d"], ["bcd"]) == "a"
    assert feed(["x", "y"], ["x"]) == ""
    assert feed(["abc"], ["zz"]) is None


def test_long_outputs_with_many_stop_strings_cut_where_a_full_search_would() -> None:
    rng = random.Random(0)
    alphabet = "abcdefgh "
    for _ in range(30):
        stops = ["".join(rng.choices(alphabet, k=rng.randint(3, 7))) for _ in range(40)]
        pieces = ["".join(rng.choices(alphabet, k=rng.randint(1, 4))) for _ in range(3000)]
        got = feed(pieces, stops)
        whole = "".join(pieces)
        # Reference: grow the text piece by piece, each time searching all of it.
        want, text = None, ""
        for p in pieces:
            text += p
            hits = [i for i in (text.find(s) for s in stops) if i >= 0]
            if hits:
                want = text[: min(hits)]
                break
        assert got == want, (stops, whole[:200])


def test_the_token_budget_is_clamped_to_the_context() -> None:
    assert new_token_budget(16, 10, 100) == 16
    assert new_token_budget(None, 10, 100) == 90
    assert new_token_budget(500, 10, 100) == 90
    assert new_token_budget(5, 100, 100) == 1  # (a full context is refused by the caller)


def test_held_back_is_the_longest_end_that_starts_a_stop_string() -> None:
    from loom.engine.stopping import held_back

    assert held_back("and the ri", ["river", "the end"]) == 2  # "ri"
    assert held_back("and the", ["the end", "he"]) == 3  # "the" (of "the end")
    assert held_back("nothing", ["xyz"]) == 0
    assert held_back("ab", ["ab"]) == 0  # a whole stop string is found, not held
