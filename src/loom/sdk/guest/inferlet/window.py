"""KV policies that keep a context's attention bounded: an attention sink (the first
tokens) plus a sliding window of the latest ones. Everything between is hidden from later
passes and, when ``drop``, its pages are let go of, so the KV stays bounded however long
the generation runs."""

from __future__ import annotations

from inferlet.context import Context


class SlidingWindow:
    """Keep the first ``sink`` tokens and about the last ``window`` (hidden in whole
    pages, so a page is hidden once and at most one page of tokens more is kept)."""

    def __init__(self, sink: int, window: int, drop: bool = True) -> None:
        if sink < 0 or window < 1:
            raise ValueError("sink must be >= 0 and window >= 1")
        self.sink, self.window, self.drop = sink, window, drop
        self.hidden_to = sink  # positions [sink, hidden_to) are hidden
        self.dropped = 0  # pages let go of

    def apply(self, ctx: Context) -> None:
        """Hide what fell out of the window since the last call (call after each step)."""
        ps = ctx.page_size
        end = (ctx.written - self.window) // ps * ps
        if end <= self.hidden_to:
            return
        if self.drop:
            self.dropped += ctx.drop_tokens(self.hidden_to, end)
        else:
            ctx.mask_tokens(self.hidden_to, end)
        self.hidden_to = end
