"""Where a generation stops: stop strings, found by a windowed earliest-match search, and
the token budget a context leaves. One implementation for every path that generates: the
offline scheduler (``output_processor``), the runtime's host generations (the OpenAI API,
inferlets' ``generate``) and the clamps of their requests.
"""

from __future__ import annotations

from collections.abc import Sequence


def find_stop(text: str, new_from: int, stops: Sequence[str]) -> int:
    """Where the earliest stop string in ``text`` starts, or -1, given that
    ``text[:new_from]`` held none (it was searched when it was new).

    A match must end at or after ``new_from``, so it starts at or after ``new_from -
    len(stop) + 1``: only that tail is searched, and a long output costs the same per
    token as a short one. The earliest start wins, whatever the order of ``stops``."""
    best = -1
    for stop in stops:
        at = text.find(stop, max(0, new_from - len(stop) + 1))
        if at != -1 and (best == -1 or at < best):
            best = at
    return best


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is the start of a stop string (and so
    must not be streamed yet: the next tokens may complete the stop string)."""
    held = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:k]):
                held = k
                break
    return held


def new_token_budget(requested: int | None, context_tokens: int, max_model_len: int) -> int:
    """Tokens a generation may add to a context of ``context_tokens``: ``requested``
    (None: as many as fit), clamped to what the context holds, and at least one (a full
    context is the caller's to refuse)."""
    room = max_model_len - context_tokens
    return max(1, room if requested is None else min(requested, room))
