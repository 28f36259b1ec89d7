"""Appends sampled tokens to requests and decides when a request is finished.

Stop tokens, stop strings (matched on incrementally detokenized text and cut from it),
``max_tokens`` and the context length are all checked here, once per new token.
"""

from __future__ import annotations

from loom.engine.batch import OutputResult
from loom.engine.request import Request
from loom.engine.stopping import find_stop
from loom.models.detokenizer import IncrementalDetokenizer
from loom.models.tokenizer import Tokenizer


class OutputProcessor:
    def __init__(
        self,
        tokenizer: Tokenizer,
        eos_token_ids: tuple[int, ...],
        max_model_len: int,
    ) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len

    def append(self, req: Request, result: OutputResult) -> str | None:
        """Record one sampled token; return the finish reason, or None to continue."""
        token = result.token
        assert token is not None, "a sampling step produced no token"
        req.output_ids.append(token)
        params = req.params
        if params.logprobs is not None:
            req.logprobs.append(result.logprob if result.logprob is not None else 0.0)
            if params.logprobs > 0:
                req.top_logprobs.append(result.top_logprobs)
        is_stop_token = token in params.stop_token_ids or (
            not params.ignore_eos and token in self.eos_token_ids
        )
        if is_stop_token:
            return "stop"
        if req.detokenizer is None:
            req.detokenizer = IncrementalDetokenizer(self.tokenizer, req.prompt_ids)
        delta = req.detokenizer.push(token)
        if delta:
            before = len(req.text)
            req.text += delta
            cut = find_stop(req.text, before, params.stop) if params.stop else -1
            if cut >= 0:
                req.text = req.text[:cut]
                return "stop"
        if len(req.output_ids) >= params.max_tokens or req.num_tokens >= self.max_model_len:
            req.text += req.detokenizer.flush()  # an incomplete character at the very end
            return "length"
        return None
