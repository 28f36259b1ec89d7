"""The SDK inside real inferlets: completion equals the engine, forks batch together."""

from __future__ import annotations

import json
from typing import Any

from loom import LLM, SamplingParams
from tests.runtime_helpers import free_pages
from tests.runtime_helpers import run_inferlet as run


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


def test_decode_steps_between_other_uses_of_the_context_equal_the_engine(
    srt: Any, sdkkit: str, tiny_dir: Any
) -> None:
    # Each decode step queues the next one ahead; a fill or a new sampler settles it
    # (the fill must come after the last token, the new sampler must sample again).
    text, extra = "Once upon a time there", 42
    free0 = free_pages(srt)
    result, messages = run(srt, sdkkit, "interleaved", text, str(extra))
    assert result.ok, result.error
    first = _reference(srt, tiny_dir, text, 3)
    prompt = srt.tokenizer.encode(text, add_special_tokens=False)
    llm = LLM(str(tiny_dir), num_pages=32)
    rest = llm.generate(
        [[*prompt, *first, extra]], SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True)
    )[0].token_ids
    assert json.loads(messages[-1]) == first + list(rest)
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


def test_next_distribution_is_sorted_and_led_by_the_greedy_token(srt: Any, sdkkit: str) -> None:
    result, messages = run(srt, sdkkit, "dist", "Once upon a time", "5")
    assert result.ok, result.error
    out = json.loads(messages[-1])
    probs = [p for _, p in out["dist"]]
    assert len(probs) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0001
    assert out["dist"][0][0] == out["greedy"]


def test_beam_search_returns_the_best_scoring_beams(srt: Any, sdkkit: str, tiny_dir: Any) -> None:
    import math

    import torch

    text = "Once upon a time"
    result, messages = run(srt, sdkkit, "beam", text, "3", "4")
    assert result.ok, result.error
    beams = json.loads(messages[-1])
    assert len(beams) == 3
    scores = [s for _, s in beams]
    assert scores == sorted(scores, reverse=True)
    # Each score is the beam's log-probability under the reference implementation.
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_dir), torch_dtype=torch.float32)
    prompt = srt.tokenizer.encode(text, add_special_tokens=False)

    def logprob(cont: list[int]) -> float:
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + cont])).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        return float(sum(lp[len(prompt) - 1 + i, t] for i, t in enumerate(cont)))

    for toks, score in beams:
        assert math.isclose(score, logprob(toks), abs_tol=1e-3)
    # The best beam scores at least as well as greedy decoding of the same length.
    llm = LLM(str(tiny_dir), num_pages=32)
    greedy = llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0,
                                                   ignore_eos=True))[0].token_ids  # fmt: skip
    assert scores[0] >= logprob(list(greedy)) - 1e-4


def test_speculative_decoding_equals_greedy(srt: Any, sdkkit: str, tiny_dir: Any) -> None:
    text = "The quick brown fox"
    truth = _reference(srt, tiny_dir, text, 17)
    result, messages = run(srt, sdkkit, "spec", text, json.dumps(truth[:16]))
    assert result.ok, result.error
    out = json.loads(messages[-1])
    assert out["tokens"] == truth[:16]
    assert out["after"] == truth[16]
    assert out["passes"] < 15  # several tokens per pass when the drafter is right
    assert out["accepted"] > 0


def test_attention_sink_keeps_the_kv_bounded(srt: Any, sdkkit: str) -> None:
    free0 = free_pages(srt)
    result, messages = run(srt, sdkkit, "sink", "Once upon a time there was", "90")
    assert result.ok, result.error
    out = json.loads(messages[-1])
    assert out["tokens"] > 90 and out["dropped"] >= 3
    assert out["most_pages"] <= 5  # without dropping: ceil(out["tokens"] / 16) = 7
    assert free_pages(srt) == free0


def test_an_exported_context_continues_in_another_inferlet(srt: Any, sdkkit: str) -> None:
    free0 = free_pages(srt)
    result, messages = run(srt, sdkkit, "export", "a prompt that spans more than one page", "ctx1")
    assert result.ok, result.error
    expected = json.loads(messages[0])
    result, messages = run(srt, sdkkit, "import", "ctx1")
    assert result.ok, result.error
    assert json.loads(messages[-1]) == expected
    srt.query(lambda: srt.exports.remove("ctx1"))
    assert free_pages(srt) == free0


def test_pubsub_channels_store_and_the_rest(srt: Any, sdkkit: str) -> None:
    sub = srt.launch(sdkkit, ["pubsub", "sub"])
    assert sub.recv(30) == "subscribed"
    assert srt.launch(sdkkit, ["pubsub", "pub", "hello all"]).wait(30).ok
    assert sub.wait(30).ok and sub.recv(5) == "got hello all"
    puller = srt.launch(sdkkit, ["channel", "pull"])
    assert srt.launch(sdkkit, ["channel", "push", "job-1"]).wait(30).ok
    assert puller.wait(30).ok and puller.recv(5) == "pulled job-1"
    result, messages = run(srt, sdkkit, "misc", "x")
    assert result.ok, result.error
    out = json.loads(messages[-1])
    assert "k1" in out["keys"] and out["got"] == "v1" and out["after"] is None
    assert out["args"] == ["misc", "x"] and out["model"]


def test_http_and_child_inferlets(srt: Any, sdkkit: str) -> None:
    import http.server
    import threading

    class Echo(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            reply = body + b"/" + self.headers["x-test"].encode()
            self.send_response(201)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    saved = srt.reconfigure(http_allow_hosts=("127.0.0.1",))
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        puller = srt.launch(sdkkit, ["channel", "pull"])
        result, messages = run(srt, sdkkit, "net", url, sdkkit)
        assert result.ok, result.error
        out = json.loads(messages[-1])
        assert out["status"] == 201 and out["text"] == "ping/sdk"
        # The child pushed to the channel the puller waits on.
        assert puller.wait(30).ok and puller.recv(5) == "pulled from-child"
    finally:
        srt.reconfigure(saved)
        server.shutdown()


def test_the_readme_example_runs_its_forks_together(srt: Any, tiny_dir: Any) -> None:
    from pathlib import Path

    from loom.runtime.runtime import RuntimeStats
    from loom.sdk.build import build_inferlet

    app = Path(__file__).resolve().parents[2] / "inferlets" / "fork_choices"
    program = srt.add_program(build_inferlet(app).read_bytes())
    free0 = free_pages(srt)
    srt.query(lambda: setattr(srt, "stats", RuntimeStats()))
    result, messages = run(srt, program, "A long prompt that fills more than one KV page, surely")
    assert result.ok, result.error
    assert messages and messages[-1].count("\n") >= 3  # four completions, newline-joined
    sizes = list(srt.stats.batch_sizes)
    assert sizes[0] == 1 and max(sizes) == 4  # the flush, then the four forks together
    assert free_pages(srt) == free0


def test_tree_speculation_equals_greedy(srt: Any, sdkkit: str, tiny_dir: Any) -> None:
    text = "The quick brown fox"
    truth = _reference(srt, tiny_dir, text, 17)
    result, messages = run(srt, sdkkit, "spec_tree", text, json.dumps(truth[:16]))
    assert result.ok, result.error
    out = json.loads(messages[-1])
    assert out["tokens"] == truth[:16]
    assert out["after"] == truth[16]
    assert out["passes"] < 10 and out["accepted"] > 0  # several tokens per pass


def test_a_flushed_context_and_its_fork_continue_whatever_the_prompt_length(
    srt: Any, sdkkit: str, tiny_dir: Any
) -> None:
    # Nothing is pending after a flush; a prompt of whole pages leaves no partly filled
    # page for a fork to recompute either (once "nothing to continue from").
    text = "Once upon a time there was a robot who lived in a tower by the sea, " * 3
    free0 = free_pages(srt)
    for n in (32, 23):
        result, messages = run(srt, sdkkit, "repend", text, str(n), "6")
        assert result.ok, result.error
        got = json.loads(messages[-1])
        assert len(got["ids"]) == n
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        want = list(LLM(str(tiny_dir), num_pages=32).generate([got["ids"]], params)[0].token_ids)
        assert got["fork"] == got["self"] == want
        assert got["step"] == got["dist"] == want[0]
    assert free_pages(srt) == free0


def test_complete_returns_logprobs_and_samples_only_allowed_tokens(
    srt: Any, sdkkit: str, tiny_dir: Any
) -> None:
    text, n = "Once upon a time there", 6
    prompt = srt.tokenizer.encode(text, add_special_tokens=False)
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=0)
    ref = LLM(str(tiny_dir), num_pages=32).generate([prompt], params)[0]
    # Allowed: the greedy first token and a few others, not the greedy second token.
    allowed = sorted({ref.token_ids[0], 5, 7, 11, 13} - {ref.token_ids[1]})
    result, messages = run(srt, sdkkit, "complete", text, str(n), ",".join(map(str, allowed)))
    assert result.ok, result.error
    got = json.loads(messages[-1])
    free, masked = got["free"], got["masked"]
    assert free["tokens"] == list(ref.token_ids) and free["reason"] == "length"
    assert ref.logprobs is not None
    assert all(abs(a - b) < 1e-3 for a, b in zip(free["logprobs"], ref.logprobs, strict=True))
    assert len(masked["tokens"]) == n and set(masked["tokens"]) <= set(allowed)
    assert masked["tokens"][0] == ref.token_ids[0]  # the overall argmax was allowed
    assert all(lp <= 0 for lp in masked["logprobs"]) and len(masked["logprobs"]) == n
