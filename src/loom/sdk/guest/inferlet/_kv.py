"""KV-cache bookkeeping of contexts: page math and reference counts (pure Python).

A context's KV is its page list read in order; ``kv_len`` tokens are written. Forked
contexts share full pages by reference; a page goes back to the host when the last
context holding it releases it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def pages_for(tokens: int, page_size: int) -> int:
    """Pages that hold ``tokens`` slots."""
    return -(-tokens // page_size)


def last_page_len(tokens: int, page_size: int) -> int:
    """Fill of the last page when ``tokens`` (>= 1) slots are written."""
    return (tokens - 1) % page_size + 1


class PageRefs:
    """How many contexts of this inferlet hold each page."""

    def __init__(self) -> None:
        self.count: dict[int, int] = {}

    def hold(self, pages: list[int]) -> None:
        for p in pages:
            self.count[p] = self.count.get(p, 0) + 1

    def release(self, pages: list[int]) -> list[int]:
        """Drop one hold on each page; the pages nobody holds any more (to free)."""
        gone = []
        for p in pages:
            n = self.count.get(p, 0) - 1
            if n < 0:
                raise ValueError(f"page {p} released more often than held")
            if n == 0:
                del self.count[p]
                gone.append(p)
            else:
                self.count[p] = n
        return gone


class IncrementalText:
    """Text pieces of a growing token list, never splitting a multi-byte character.

    ``decode`` is the tokenizer's; a piece is emitted once the text decoded so far no
    longer ends in a replacement character (an incomplete UTF-8 sequence).
    """

    def __init__(self, decode: object) -> None:
        self._decode = decode
        self.tokens: list[int] = []
        self._emitted = 0

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text: str = self._decode(self.tokens)  # type: ignore[operator]
        if text.endswith("\ufffd"):
            return ""
        piece = text[self._emitted :]
        self._emitted = len(text)
        return piece


def encode_brle(mask: list[bool]) -> list[int]:
    """Run lengths of ``mask`` (true = masked out), starting with a run of false.

    The same encoding as ``loom.engine.masks.encode_brle``; the guest cannot import the
    server package, so the SDK carries its own copy."""
    runs: list[int] = []
    current, count = False, 0
    for bit in mask:
        if bit == current:
            count += 1
        else:
            runs.append(count)
            current, count = bit, 1
    runs.append(count)
    return runs


def only_token(token: int, vocab: int) -> list[int]:
    """The BRLE logit mask forbidding every id but ``token``."""
    if not 0 <= token < vocab:
        raise ValueError(f"token id {token} is not in [0, {vocab})")
    runs = [0, token, 1, vocab - token - 1] if token else [1, vocab - 1]
    return runs if runs[-1] else runs[:-1]


def draft_tree(draft: Iterable[Any]) -> list[tuple[int, int]]:
    """A drafter's chain (``[t, ...]``) or tree (``[(t, parent), ...]``) as tree nodes
    ``(token, parent)``; a parent must come before its child (-1: the root)."""
    nodes: list[tuple[int, int]] = []
    for i, item in enumerate(draft):
        if isinstance(item, (tuple, list)):
            tok, par = int(item[0]), int(item[1])
        else:
            tok, par = int(item), i - 1
        if not -1 <= par < i:
            raise ValueError(f"draft node {i}: parent {par} must come before it (or be -1)")
        nodes.append((tok, par))
    return nodes
