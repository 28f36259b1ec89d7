"""Prefix cache over full KV pages, keyed by a hash chain of their tokens.

Page i of a token sequence is keyed by H(key of page i-1, tokens of page i), so a key
names the whole prefix up to that page. The cache holds one reference on each page it
lists; a page only the cache references is evictable, least recently used first (deeper
pages first among equals, so a chain is trimmed from its tail).
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass

from loom.engine.page_pool import PagePool

ROOT_KEY = b"loom-prefix-root"


def chain_keys(
    tokens: list[int],
    page_size: int,
    num_pages: int,
    parent: bytes = ROOT_KEY,
) -> list[bytes]:
    """Keys of the first ``num_pages`` full pages of ``tokens`` (continuing from ``parent``)."""
    keys = []
    for i in range(num_pages):
        chunk = array("q", tokens[i * page_size : (i + 1) * page_size]).tobytes()
        parent = hashlib.blake2b(parent + chunk, digest_size=16).digest()
        keys.append(parent)
    return keys


@dataclass(slots=True)
class _Entry:
    page: int
    depth: int
    last_used: int


class PrefixCache:
    def __init__(self, pool: PagePool, enabled: bool = True) -> None:
        # Disabled: matches nothing and keeps nothing (a server run without prefix
        # caching), so callers need no second code path.
        self.pool, self.enabled = pool, enabled
        self._entries: dict[bytes, _Entry] = {}
        self._clock = 0
        self.hits = self.queries = 0  # pages matched / pages asked for
        pool.reclaimer = self

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def num_evictable(self) -> int:
        return sum(1 for e in self._entries.values() if self.pool.refcount(e.page) == 1)

    def match(self, keys: list[bytes]) -> list[int]:
        """Pages of the longest cached prefix of ``keys``; the caller receives a reference."""
        if not self.enabled:
            return []
        self._clock += 1
        pages: list[int] = []
        for key in keys:
            entry = self._entries.get(key)
            if entry is None:
                break
            entry.last_used = self._clock
            pages.append(entry.page)
        self.pool.incref(pages)
        self.queries += len(keys)
        self.hits += len(pages)
        return pages

    def insert(self, keys: list[bytes], pages: list[int], first_depth: int = 0) -> None:
        """Register full pages under their chain keys (the cache takes its own reference)."""
        if not self.enabled:
            return
        self._clock += 1
        for depth, (key, page) in enumerate(zip(keys, pages, strict=True), first_depth):
            if key in self._entries:
                self._entries[key].last_used = self._clock
                continue
            self.pool.incref([page])
            self._entries[key] = _Entry(page, depth, self._clock)

    def evict(self, n: int) -> int:
        """Free up to ``n`` pages that only the cache holds; returns how many were freed."""
        victims = sorted(
            (k for k, e in self._entries.items() if self.pool.refcount(e.page) == 1),
            key=lambda k: (self._entries[k].last_used, -self._entries[k].depth),
        )[:n]
        for key in victims:
            self.pool.free([self._entries.pop(key).page])
        return len(victims)

    def clear(self) -> int:
        """Drop every entry the cache alone holds (shared pages stay listed)."""
        return self.evict(len(self._entries))
