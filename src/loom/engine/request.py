"""A generation request as the built-in scheduler tracks it, and its user-facing output."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from loom.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    ENDING = "ending"  # its last token is known; finished once that token is text
    FINISHED = "finished"


@dataclass(eq=False)  # identity: two requests are never "equal" by their fields
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    text: str = ""
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    # ===== KV state =====
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens of prompt+output whose KV is in `pages`
    num_cached_tokens: int = 0  # of those, taken from the prefix cache at admission
    page_keys: list[bytes] = field(default_factory=list)  # prefix-chain keys of full pages
    num_inserted_pages: int = 0  # full pages already offered to the prefix cache
    num_preemptions: int = 0
    detokenizer: Any = None  # IncrementalDetokenizer while running
    num_detokenized: int = 0  # output ids already turned into text
    # Output ids at the end that are placeholders for tokens of steps not read back yet,
    # and this request's output index in the latest scheduled step.
    num_pending: int = 0
    sample_index: int = -1
    # perf_counter times of the first and the latest sampled token (time per output token)
    first_token_at: float | None = None
    last_token_at: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def tokens(self, start: int, end: int) -> list[int]:
        """Tokens ``[start, end)`` of prompt + output, without joining the two lists."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:
            return self.output_ids[start - n : end - n]
        return self.prompt_ids[start:] + self.output_ids[: end - n]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


@dataclass
class RequestOutput:
    """What ``LLM.generate`` returns per prompt."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[float] | None = None  # of each chosen token, when asked
    top_logprobs: list[list[tuple[int, float]]] | None = None
    num_cached_tokens: int = 0
    first_token_at: float | None = None  # perf_counter time of the first sampled token
    last_token_at: float | None = None  # ...and of the last

    @classmethod
    def of(cls, req: Request) -> RequestOutput:
        want = req.params.logprobs is not None
        return cls(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=list(req.prompt_ids),
            token_ids=list(req.output_ids),
            text=req.text,
            finish_reason=req.finish_reason,
            logprobs=list(req.logprobs) if want else None,
            top_logprobs=[list(t) for t in req.top_logprobs]
            if want and req.params.logprobs
            else None,
            num_cached_tokens=req.num_cached_tokens,
            first_token_at=req.first_token_at,
            last_token_at=req.last_token_at,
        )
