"""Jacobi decoding converges to the greedy output; it reports its passes per token."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loom import LLM, SamplingParams
from tests.inferlets.conftest import program, reply
from tests.runtime_helpers import free_pages


def test_jacobi_decoding_equals_greedy(irt: Any, tiny_dir: Path) -> None:
    prog = program(irt, "jacobi_decoding")
    free0 = free_pages(irt)
    prompt, n = "The mill stood by the river. The mill stood by the river. The mill", 40
    ids = irt.tokenizer.encode(prompt, add_special_tokens=False)
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    want = list(LLM(str(tiny_dir), num_pages=32).generate([ids], params)[0].token_ids)
    for k in ("1", "6"):
        got = json.loads(reply(irt, prog, prompt, str(n), k))
        assert got["tokens"] == want
        assert 0 < got["passes"] <= n and got["passes_per_token"] == got["passes"] / n
    assert free_pages(irt) == free0
