"""The SDK inside real inferlets: completion equals the engine, forks batch together."""

from __future__ import annotations

import json
from typing import Any

from loom import LLM, SamplingParams


def run(rt: Any, program: str, *args: str) -> tuple[Any, list[str]]:
    h = rt.launch(program, list(args))
    result = h.wait(120)
    messages = []
    while not h.messages.empty():
        messages.append(h.messages.get())
    return result, messages


def free_pages(rt: Any) -> int:
    return int(rt.query(lambda: rt.pool.num_free))


def _reference(rt: Any, tiny_dir: Any, text: str, n: int) -> list[int]:
    prompt = rt.tokenizer.encode(text, add_special_tokens=False)
    llm = LLM(str(tiny_dir), num_pages=32)
    return list(llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0,
                                                      ignore_eos=True))[0].token_ids)  # fmt: skip


def test_decode_steps_equal_the_engine(srt: Any, sdkkit: str, tiny_dir: Any) -> None:
    free0 = free_pages(srt)
    result, messages = run(srt, sdkkit, "steps", "Once upon a time there", "12")
    assert result.ok, result.error
    assert json.loads(messages[-1]) == _reference(srt, tiny_dir, "Once upon a time there", 12)
    assert free_pages(srt) == free0


def test_fast_path_equals_the_engine(srt: Any, sdkkit: str, tiny_dir: Any) -> None:
    text = "The quick brown fox"
    result, messages = run(srt, sdkkit, "fast", text, "20")
    assert result.ok, result.error
    out = json.loads(messages[-1])
    ref = _reference(srt, tiny_dir, text, 20)
    prompt = srt.tokenizer.encode(text, add_special_tokens=False)
    assert out["tokens"] == prompt + ref
    assert out["pending"] == ref[-1:]  # the last token is not yet in the KV cache
    assert out["text"] == srt.tokenizer.decode(ref)


def test_gather_over_eight_forks_is_one_batch_per_step(
    srt: Any, sdkkit: str, tiny_dir: Any
) -> None:
    from loom.runtime.runtime import RuntimeStats

    prompt = "a long shared prompt that fills more than one page of the cache"
    srt.query(lambda: setattr(srt, "stats", RuntimeStats()))
    result, messages = run(srt, sdkkit, "forks", prompt, "8", "4")
    assert result.ok, result.error
    outs = json.loads(messages[-1])
    assert len(outs) == 8 and all(len(o) == 5 for o in outs)  # the filled token + 4 steps
    sizes = list(srt.stats.batch_sizes)
    # The parent's flush, then one batch of all 8 forks per step.
    assert sizes == [1, 8, 8, 8, 8], sizes
    # Each fork equals a solo run of its tokens (shared pages, recomputed partial page).
    base = srt.tokenizer.encode(prompt, add_special_tokens=False)
    llm = LLM(str(tiny_dir), num_pages=64)
    refs = llm.generate(
        [[*base, 10 + i] for i in range(8)],
        SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
    )
    assert outs == [[10 + i, *r.token_ids] for i, r in enumerate(refs)]


def test_messages_and_errors(srt: Any, sdkkit: str) -> None:
    h = srt.launch(sdkkit, ["echo"])
    assert h.recv(30) == "ready"
    h.send("hi")
    assert h.wait(30).ok
    assert h.recv(5) == "echo:hi"
    result, _ = run(srt, sdkkit, "fail")
    assert not result.ok
    assert "ValueError: boom from the app" in (result.error or "")
    assert "scenarios.py" in (result.error or "")  # the traceback names the app's file
