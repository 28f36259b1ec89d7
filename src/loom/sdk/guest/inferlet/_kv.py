"""KV-cache bookkeeping of contexts: page math and reference counts (pure Python).

A context's KV is its page list read in order; ``kv_len`` tokens are written. Forked
contexts share full pages by reference; a page goes back to the host when the last
context holding it releases it.
"""

from __future__ import annotations


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
