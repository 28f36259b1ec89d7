"""Logical KV pages: allocation, reference counts, reclaiming. Pure Python, no tensors.

A page is shared by reference counting: forks, prefix-cache hits and imports add a
reference instead of copying, and a page returns to the free list when its last holder
lets go. Before writing into a page with ``refcount > 1`` a holder copies it first
(``is_shared`` tells when); that is all copy-on-write needs from the pool.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Protocol

from loom.errors import OutOfPagesError


class Reclaimer(Protocol):
    """Something holding pages it can give back on demand (the prefix cache)."""

    @property
    def num_evictable(self) -> int: ...

    def evict(self, n: int) -> int:
        """Free up to ``n`` pages; return how many were freed."""
        ...


class PagePool:
    def __init__(self, num_pages: int, page_size: int = 16) -> None:
        if num_pages <= 0 or page_size <= 0:
            raise ValueError("num_pages and page_size must be positive")
        self.num_pages, self.page_size = num_pages, page_size
        self._free: deque[int] = deque(range(num_pages))
        self._refs = [0] * num_pages
        self._fresh: list[int] = []  # allocated since the last drain_fresh()
        self.reclaimer: Reclaimer | None = None

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def pages_for(self, num_tokens: int) -> int:
        """Pages needed to hold ``num_tokens`` slots."""
        return -(-num_tokens // self.page_size)

    def num_available(self) -> int:
        """Free pages plus pages a reclaimer could free on demand."""
        return self.num_free + (self.reclaimer.num_evictable if self.reclaimer else 0)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free or n <= self.num_available()

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` pages with refcount 1; reclaims cached pages when short.

        Raises ``OutOfPagesError`` (allocating nothing) when the pool cannot supply ``n``.
        """
        if n > len(self._free) and self.reclaimer is not None:
            self.reclaimer.evict(n - len(self._free))
        if n > len(self._free):
            raise OutOfPagesError(f"need {n} KV pages, {len(self._free)} free of {self.num_pages}")
        pages = [self._free.popleft() for _ in range(n)]
        for p in pages:
            self._refs[p] = 1
        self._fresh.extend(pages)
        return pages

    def incref(self, pages: Iterable[int]) -> None:
        for p in pages:
            assert self._refs[p] > 0, f"incref of free page {p}"
            self._refs[p] += 1

    def free(self, pages: Iterable[int]) -> None:
        """Drop one reference from each page; pages reaching zero become free."""
        for p in pages:
            assert self._refs[p] > 0, f"double free of page {p}"
            self._refs[p] -= 1
            if self._refs[p] == 0:
                self._free.append(p)

    def refcount(self, page: int) -> int:
        return self._refs[page]

    def is_shared(self, page: int) -> bool:
        return self._refs[page] > 1

    def drain_fresh(self) -> list[int]:
        """Pages allocated since the last call (the runner clears their slot state)."""
        fresh, self._fresh = self._fresh, []
        return fresh
