"""Greedy generation and logprobs of ``LLM`` against Hugging Face ``generate``."""

from pathlib import Path

import pytest
import torch

from loom import LLM, SamplingParams
from tests.helpers import assert_all_pages_free
from tests.model_factory import FAMILIES

PROMPT_LENS = [3, 17, 33, 50]
NEW_TOKENS = 12


def prompts(n: int = len(PROMPT_LENS)) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [[0, *torch.randint(10, 2048, (k - 1,), generator=g).tolist()] for k in PROMPT_LENS]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_and_logprobs_match_transformers(
    family: str, family_dirs: dict[str, Path]
) -> None:
    from transformers import AutoModelForCausalLM

    path = family_dirs[family]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(str(path), num_pages=64)
    outs = llm.generate(
        prompts(), SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, logprobs=0)
    )
    for prompt, out in zip(prompts(), outs, strict=True):
        with torch.inference_mode():
            ref = hf.generate(
                torch.tensor([prompt]),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
        ref_tokens = ref.sequences[0, len(prompt) :].tolist()
        assert out.token_ids == ref_tokens, f"{family} prompt of {len(prompt)} tokens"
        ref_lp = [
            float(torch.log_softmax(lg[0].float(), -1)[t])
            for lg, t in zip(ref.logits, ref_tokens, strict=False)
        ]
        assert out.logprobs is not None
        assert max(abs(a - b) for a, b in zip(out.logprobs, ref_lp, strict=True)) < 1e-3
    assert_all_pages_free(llm)
