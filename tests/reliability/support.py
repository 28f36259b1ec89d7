"""What the reliability tests share: waiting for a condition, and a greedy completion
submitted straight to a runtime."""

from __future__ import annotations

import threading
import time
from typing import Any


def wait_for(cond: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def complete(
    rt: Any, max_tokens: int, first: threading.Event | None = None
) -> tuple[threading.Event, list[Any]]:
    """Submit a greedy completion of ``max_tokens`` (end of sequence ignored); ``(done,
    [result])`` once it ends. ``first`` is set at its first token."""
    from loom.engine.batch import SamplerSpec
    from loom.runtime.completions import CompletionRequest

    done, box = threading.Event(), []
    prompt = rt.tokenizer.encode("Once upon a time", add_special_tokens=False)
    rt.submit_completion(
        CompletionRequest(prompt, SamplerSpec(temperature=0.0), max_tokens,
                          lambda r: (box.append(r), done.set()), stop_at_eos=False,
                          on_delta=(lambda *_: first.set()) if first else None)
    )  # fmt: skip
    return done, box
