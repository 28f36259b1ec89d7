"""Automatic prefix caching of inferlet contexts: a context filling a prompt another
context already wrote takes the prompt's full pages from the prefix cache (computing the
same tokens), through ``generate`` and through plain forward passes; a context changing
a page it shares gets its own copy first."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loom import LLM, SamplingParams
from tests.runtime_helpers import free_pages
from tests.runtime_helpers import run_inferlet as run

PROMPT = "Once upon a time there was a little robot who lived in a tall grey tower. " * 3


def _cached(rt: Any) -> int:
    return int(rt.query(lambda: rt.stats.context_cached_tokens))


def _computed(rt: Any) -> int:
    return int(rt.query(lambda: rt.stats.batch_tokens))


def _reference(tiny_dir: Path, prompt: list[int], n: int) -> list[int]:
    llm = LLM(str(tiny_dir), num_pages=32, enable_prefix_caching=False)
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    return list(llm.generate([prompt], params)[0].token_ids)


def _clear_cache(rt: Any) -> None:
    rt.query(lambda: rt.prefix_cache.clear())


def test_contexts_filling_the_same_prompt_share_its_full_pages(
    srt: Any, sdkkit: str, tiny_dir: Path
) -> None:
    _clear_cache(srt)
    ps = srt.page_size
    prompt = srt.tokenizer.encode(PROMPT, add_special_tokens=False)
    assert len(prompt) > 3 * ps
    shareable = (len(prompt) - 1) // ps * ps  # the last token always goes through the model
    want = _reference(tiny_dir, prompt, 8)
    free0 = free_pages(srt)

    # A plain forward pass from position 0 (fill, then decode steps) publishes its pages.
    c0 = _cached(srt)
    result, messages = run(srt, sdkkit, "steps", PROMPT, "8")
    assert result.ok, result.error
    assert json.loads(messages[-1]) == want
    assert _cached(srt) == c0  # the cache was empty

    # A host-side generation from an empty context takes them ...
    t0 = _computed(srt)
    result, messages = run(srt, sdkkit, "fast", PROMPT, "8")
    assert result.ok, result.error
    assert json.loads(messages[-1])["tokens"][len(prompt) :] == want
    assert _cached(srt) == c0 + shareable
    assert _computed(srt) - t0 <= len(prompt) - shareable + 8  # the rest, then a token a step

    # ... and so does the next context's forward pass.
    result, messages = run(srt, sdkkit, "steps", PROMPT, "8")
    assert result.ok, result.error
    assert json.loads(messages[-1]) == want
    assert _cached(srt) == c0 + 2 * shareable
    assert free_pages(srt) == free0  # nothing held but by the cache, which gives it back


def test_a_context_masking_a_shared_page_masks_its_own_copy(
    srt: Any, sdkkit: str, tiny_dir: Path
) -> None:
    _clear_cache(srt)
    prompt = srt.tokenizer.encode(PROMPT, add_special_tokens=False)
    free0 = free_pages(srt)
    # Alone: the masked generation with nothing shared.
    result, messages = run(srt, sdkkit, "masked", PROMPT, "4", "8")
    assert result.ok, result.error
    alone = json.loads(messages[-1])
    _clear_cache(srt)

    result, messages = run(srt, sdkkit, "fast", PROMPT, "8")
    assert result.ok, result.error
    plain = json.loads(messages[-1])["tokens"]
    assert plain[len(prompt) :] == _reference(tiny_dir, prompt, 8)
    c0 = _cached(srt)
    # Its first page comes from the cache, and it hides four of that page's tokens.
    result, messages = run(srt, sdkkit, "masked", PROMPT, "4", "8")
    assert result.ok, result.error
    assert _cached(srt) > c0
    assert json.loads(messages[-1]) == alone  # its copy holds the same KV
    assert json.loads(messages[-1]) != plain  # (the mask changes what the model sees)
    # The cached page is unchanged: the next context still sees every token.
    result, messages = run(srt, sdkkit, "fast", PROMPT, "8")
    assert result.ok, result.error
    assert json.loads(messages[-1])["tokens"] == plain
    assert free_pages(srt) == free0
