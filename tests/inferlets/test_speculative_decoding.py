"""Speculative decoding with real drafters (prompt lookup, a suffix cache of earlier
outputs; chains and trees): the output is the greedy output, and when the text repeats
earlier text a pass yields several tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from loom import LLM, SamplingParams
from tests.inferlets.conftest import program, reply
from tests.runtime_helpers import free_pages

# A document that quotes itself: the continuation repeats what came before.
PROMPT = "The mill stood by the river. " * 4 + "The mill"
N = 48


def _greedy(rt: Any, tiny_dir: Path, text: str, n: int) -> list[int]:
    ids = rt.tokenizer.encode(text, add_special_tokens=False)
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    return list(LLM(str(tiny_dir), num_pages=32).generate([ids], params)[0].token_ids)


@pytest.mark.parametrize("shape", ["chain", "tree"])
def test_prompt_lookup_equals_greedy_in_fewer_passes(irt: Any, tiny_dir: Path, shape: str) -> None:
    prog = program(irt, "speculative_decoding")
    free0 = free_pages(irt)
    got = json.loads(reply(irt, prog, PROMPT, str(N), "lookup", shape))
    assert got["tokens"] == _greedy(irt, tiny_dir, PROMPT, N)
    # (Random weights do not copy their context, so lookups are rarely right here: the
    # promise is the output. The suffix cache below shows the speed-up.)
    assert got["proposed"] > 0 and got["accepted"] + got["passes"] >= N
    assert free_pages(irt) == free0


def test_the_suffix_cache_drafts_from_earlier_outputs(irt: Any, tiny_dir: Path) -> None:
    # A prompt with nothing to look up in itself: the first run drafts little; a second
    # run of the same prompt finds its continuation in the cache of earlier outputs.
    prog = program(irt, "speculative_decoding")
    irt.query(lambda: irt.messaging.store_kv.pop("speculative_decoding/suffix-cache", None))
    prompt = "Quietly, seven purple engines hummed"
    first = json.loads(reply(irt, prog, prompt, str(N), "suffix"))
    second = json.loads(reply(irt, prog, prompt, str(N), "suffix"))
    want = _greedy(irt, tiny_dir, prompt, N)
    assert first["tokens"] == second["tokens"] == want
    # Generating the same text again (a regeneration, an edit of an earlier answer):
    # the cache's drafts are right, several tokens per pass.
    assert second["passes"] < first["passes"] and second["passes"] < N / 2, (first, second)
    tree = json.loads(reply(irt, prog, prompt, str(N), "suffix", "tree"))
    assert tree["tokens"] == want and tree["passes"] < N / 2
