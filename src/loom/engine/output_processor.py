"""Appends sampled tokens to requests and decides when a request is finished.

Stop tokens, ``max_tokens`` and the context length are checked as each token arrives;
stop strings on the incrementally detokenized text (cut from it), a step later, while the
engine runs the next pass.
"""

from __future__ import annotations

from loom.engine.batch import OutputResult
from loom.engine.request import Request, RequestStatus
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
        """Record one sampled token; return why the request ends here (a stop token, its
        length), or None. Its text comes later, from ``detokenize``."""
        token = result.token
        assert token is not None, "a sampling step produced no token"
        assert req.num_pending > 0, "a token arrived for a request that awaits none"
        index = len(req.output_ids) - req.num_pending  # its placeholder (the oldest)
        req.output_ids[index] = token
        req.num_pending -= 1
        params = req.params
        if params.logprobs is not None:
            req.logprobs.append(result.logprob if result.logprob is not None else 0.0)
            if params.logprobs > 0:
                req.top_logprobs.append(result.top_logprobs)
        if token in params.stop_token_ids or (
            not params.ignore_eos and token in self.eos_token_ids
        ):
            return "stop"
        if index + 1 >= params.max_tokens or len(req.prompt_ids) + index + 1 >= self.max_model_len:
            return "length"
        return None

    def detokenize(self, req: Request) -> str | None:
        """Turn the tokens ``append`` recorded into text; "stop" when a stop string
        appears (the text is cut there), else None. ``req.finish_reason`` is what
        ``append`` returned: a stop token adds no text, a length end flushes what is held."""
        if req.detokenizer is None:
            req.detokenizer = IncrementalDetokenizer(self.tokenizer, req.prompt_ids)
        # Not the placeholders of steps in flight; not a stop token that ended it.
        end = len(req.output_ids) - req.num_pending
        end -= req.status is RequestStatus.ENDING and req.finish_reason == "stop"
        stop = req.params.stop
        while req.num_detokenized < end:
            delta = req.detokenizer.push(req.output_ids[req.num_detokenized])
            req.num_detokenized += 1
            if delta:
                before = len(req.text)
                req.text += delta
                cut = find_stop(req.text, before, stop) if stop else -1
                if cut >= 0:
                    req.text = req.text[:cut]
                    return "stop"
        if req.finish_reason == "length":
            req.text += req.detokenizer.flush()  # an incomplete character at the very end
        return None
