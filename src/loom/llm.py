"""The offline API: ``LLM(model).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from tqdm import tqdm

from loom.config import EngineConfig
from loom.engine.engine import Engine, Prompt
from loom.engine.request import RequestOutput
from loom.models.tokenizer import Tokenizer
from loom.sampling_params import SamplingParams


class LLM:
    """Generate text offline with the built-in scheduler.

    ``LLM("tiny")`` uses the embedded default model; any other value is a Hugging Face
    directory. Extra keyword arguments are ``EngineConfig`` fields.
    """

    def __init__(
        self, model: str = "tiny", dtype: str = "float32", device: str = "cpu", **kwargs: Any
    ) -> None:
        self.engine = Engine(EngineConfig(model=str(model), dtype=dtype, device=device, **kwargs))

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in prompt order.

        A prompt is a string or a list of token ids. Every prompt is validated before any
        is queued, so a bad one raises ``RequestError`` and leaves the engine untouched.
        """
        batch = _as_prompt_list(prompts)
        if params is None:
            params = SamplingParams()
        plist = [params] * len(batch) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(batch):
            raise ValueError(f"{len(batch)} prompts but {len(plist)} SamplingParams")
        requests = [self.engine.make_request(p, sp) for p, sp in zip(batch, plist, strict=True)]
        for req in requests:
            self.engine.scheduler.add(req)
        bar = tqdm(total=len(requests), desc="generate", disable=not use_tqdm)
        while self.engine.has_unfinished():
            bar.update(len(self.engine.step()))
        bar.close()
        return [RequestOutput.of(r) for r in requests]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the text of one generation piece by piece as it is produced."""
        req = self.engine.add_request(prompt, params or SamplingParams())
        shown = 0
        while not req.is_finished:
            self.engine.step()
            if len(req.text) > shown:
                yield req.text[shown:]
                shown = len(req.text)


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    seq = list(prompts)
    if seq and all(isinstance(t, int) for t in seq):
        return [seq]  # type: ignore[list-item]
    return seq  # type: ignore[return-value]
