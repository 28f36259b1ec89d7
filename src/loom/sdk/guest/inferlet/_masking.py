"""Attention masks and KV surgery for ``Context``: a pass under a 2-D attention mask
(``write_masked``), written tokens hidden from later passes (``mask_tokens``), and the
pages they leave wholly hidden freed (``drop_tokens``, ``drop_masked_pages``)."""

from __future__ import annotations

from collections.abc import Iterable

from inferlet import _kv
from inferlet._context_base import _ContextBase
from inferlet._loop import wait_for
from inferlet._wit import kv, unwrap


class _MaskingMixin(_ContextBase):
    """``write_masked``, ``mask_tokens``, ``drop_tokens`` and ``drop_masked_pages`` of
    ``Context``."""

    async def write_masked(
        self,
        tokens: list[int],
        hidden: list[set[int]],
        *,
        distributions: Iterable[int] = (),
        k: int = 32,
    ) -> dict[int, list[tuple[int, float]]]:
        """Append ``tokens`` in one pass, token ``i`` not attending to the positions in
        ``hidden[i]`` (indices into ``tokens`` of this context, earlier than its own): a
        2-D attention mask, as hierarchical or parallel-section prompts need. Pending
        tokens are written first, causally. Returns the top-``k`` next-token distribution
        after each token index (into ``tokens``) in ``distributions``."""
        if len(hidden) != len(tokens) or not tokens:
            raise ValueError("give one hidden set per token, and at least one token")
        await self._follow()
        self._check_open()
        n_p = len(self.pending)
        base = self.written + n_p  # position of tokens[0]
        for i, h in enumerate(hidden):
            if any(not 0 <= p < base + i for p in h):
                raise ValueError(f"token {i} may hide only earlier positions (< {base + i})")
        old = [p in self.masked for p in self.slot_pos]
        rows = [_kv.encode_brle(old + [False] * (j + 1)) for j in range(n_p)]
        for i, h in enumerate(hidden):
            before = [m or p in h for m, p in zip(old, self.slot_pos, strict=True)]
            fresh = [self.written + j in h for j in range(n_p + i + 1)]
            rows.append(_kv.encode_brle(before + fresh))
        dist_at = sorted(set(distributions))
        if any(not 0 <= i < len(tokens) for i in dist_at):
            raise ValueError("distribution indices must index tokens")
        self.tokens += tokens
        inputs = self.tokens[self.written :]
        positions = list(range(self.written, self.written + len(inputs)))
        outputs = [(n_p + i, "distribution", k) for i in dist_at]
        fut = self._pass(inputs, positions, rows, outputs)
        self.written += len(inputs)
        # These slots saw a restricted view: never rewrite them as causal (``_repend``).
        self._restricted.update(positions[n_p:])
        out = unwrap(await wait_for(fut))
        self._check_flushes()
        pairs = list(zip(out.dist_ids, out.dist_probs, strict=True))  # k per index, in order
        return {i: pairs[n * k : (n + 1) * k] for n, i in enumerate(dist_at)}

    # ----- KV surgery -----

    def mask_tokens(self, start: int | range, end: int | None = None) -> None:
        """Hide tokens at positions ``start..end`` (or a ``range``) from every later pass
        of this context."""
        if isinstance(start, range):
            span = start
            if span.step != 1:
                raise ValueError("mask_tokens takes a contiguous range")
            start, end = span.start, span.stop
        if end is None:
            raise ValueError("mask_tokens needs an end (or a range)")
        self._mask(start, end, set())

    def drop_tokens(self, start: int, end: int) -> int:
        """Hide tokens at positions ``start..end`` from every later pass and free the
        pages they leave wholly hidden; the number of pages freed. Later passes attend
        over fewer pages (an agent drops its tool documentation this way once it has
        chosen its tools). Wholly hidden pages are let go of without being masked, so a
        page shared with other contexts is not copied just to be dropped."""
        self._check_open()
        ps = self.page_size
        hidden = self.masked | set(range(start, end))
        whole = {
            i for i in range(self.kv_len // ps)
            if all(pos in hidden for pos in self.slot_pos[i * ps : (i + 1) * ps])
        }  # fmt: skip
        self._mask(start, end, whole)
        return self.drop_masked_pages()

    def _mask(self, start: int, end: int, skip: set[int]) -> None:
        """Mark ``start..end`` masked and mask the pages holding them but ``skip``."""
        self._check_open()
        if not 0 <= start <= end <= self.written:
            raise ValueError(f"mask range {start}..{end} is not within the written {self.written}")
        self.masked.update(range(start, end))
        ps = self.page_size
        touched = {i // ps for i, pos in enumerate(self.slot_pos) if start <= pos < end} - skip
        for page in sorted(touched):
            slots = self.slot_pos[page * ps : (page + 1) * ps]
            keep = [pos not in self.masked for pos in slots] + [True] * (ps - len(slots))
            kv.mask(self.queue, self.pages[page], keep)

    def drop_masked_pages(self) -> int:
        """Free full pages whose every token is masked; the number of pages dropped.

        Positions are kept: later tokens still see the right distances (attention sinks,
        sliding windows)."""
        self._check_open()
        ps = self.page_size
        full = self.kv_len // ps
        drop = [
            i for i in range(full)
            if all(pos in self.masked for pos in self.slot_pos[i * ps : (i + 1) * ps])
        ]  # fmt: skip
        if not drop:
            return 0
        gone = self.model.refs.release([self.pages[i] for i in drop])
        if gone:
            kv.free(self.queue, gone)
        keep = [i for i in range(len(self.pages)) if i not in set(drop)]
        self.pages = [self.pages[i] for i in keep]
        dropped = set(drop)
        self.slot_pos = [pos for i, pos in enumerate(self.slot_pos) if i // ps not in dropped]
        return len(drop)
