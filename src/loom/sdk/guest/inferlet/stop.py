"""Stop conditions, combinable with ``|``: ``MaxTokens(64) | StopStrings("\\n\\n")``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stop:
    """When a generation ends. Unset parts do not stop it; ``None`` max means no limit."""

    max_tokens: int | None = None
    strings: tuple[str, ...] = ()
    token_ids: tuple[int, ...] = ()
    at_eos: bool = True

    def __or__(self, other: Stop) -> Stop:
        if not isinstance(other, Stop):
            return NotImplemented
        limits = [m for m in (self.max_tokens, other.max_tokens) if m is not None]
        return Stop(
            max_tokens=min(limits) if limits else None,
            strings=self.strings + tuple(s for s in other.strings if s not in self.strings),
            token_ids=self.token_ids + tuple(t for t in other.token_ids if t not in self.token_ids),
            at_eos=self.at_eos and other.at_eos,
        )

    def hit(self, tokens: list[int], text: str, eos: tuple[int, ...] = ()) -> str | None:
        """Why ``tokens`` (generated so far, decoded to ``text``) must stop, else None:
        "stop" for a stop token/string/eos, "length" for the limit."""
        if tokens and (tokens[-1] in self.token_ids or (self.at_eos and tokens[-1] in eos)):
            return "stop"
        if any(s in text for s in self.strings):
            return "stop"
        if self.max_tokens is not None and len(tokens) >= self.max_tokens:
            return "length"
        return None


def MaxTokens(n: int) -> Stop:
    if n < 1:
        raise ValueError(f"max tokens must be >= 1, got {n}")
    return Stop(max_tokens=n)


def StopStrings(*strings: str) -> Stop:
    if any(not s for s in strings):
        raise ValueError("stop strings must not be empty")
    return Stop(strings=tuple(strings))


def StopTokens(*ids: int) -> Stop:
    return Stop(token_ids=tuple(ids))


def IgnoreEos() -> Stop:
    return Stop(at_eos=False)


def as_stop(stop: Stop | str | list[str] | tuple[str, ...] | None, max_tokens: int | None) -> Stop:
    """Normalize the ``stop=`` / ``max_tokens=`` arguments of the generate calls."""
    out = Stop(max_tokens=max_tokens)
    if stop is None:
        return out
    if isinstance(stop, Stop):
        return out | stop
    if isinstance(stop, str):
        return out | StopStrings(stop)
    return out | StopStrings(*stop)
