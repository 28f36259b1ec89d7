"""The OpenAI-compatible API through the official ``openai`` client, against ``LLM``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from loom import LLM, SamplingParams
from tests.server.conftest import API_KEY

PROMPT = "Once upon a time there was a little"


@pytest.fixture(scope="module")
def client(server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def llm(tiny_dir: Path) -> LLM:
    return LLM(str(tiny_dir), num_pages=128)


def greedy(llm: LLM, prompt: str | list[int], n: int, **kw: Any) -> Any:
    return llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0, **kw))[0]


def test_models_lists_the_served_model(client: openai.OpenAI, model_name: str) -> None:
    assert [m.id for m in client.models.list()] == [model_name]


def test_completion_greedy_equals_llm_generate(
    client: openai.OpenAI, llm: LLM, model_name: str
) -> None:
    want = greedy(llm, PROMPT, 20, ignore_eos=True)
    got = client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=20, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == "length"
    assert got.usage is not None
    assert got.usage.completion_tokens == 20
    assert got.usage.prompt_tokens == len(llm.tokenizer.encode(PROMPT))


def test_completion_stream_equals_non_stream(
    client: openai.OpenAI, llm: LLM, model_name: str
) -> None:
    want = greedy(llm, PROMPT, 24, ignore_eos=True)
    stream = client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want.text
    assert len([c for c in chunks if c.choices]) > 2  # really streamed, piece by piece
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 24
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_greedy_equals_llm_generate_with_the_template(
    client: openai.OpenAI, llm: LLM, model_name: str
) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    prompt = llm.tokenizer.apply_chat_template(messages)
    want = greedy(llm, prompt, 16)
    got = client.chat.completions.create(
        model=model_name,
        messages=messages,
        max_tokens=16,
        temperature=0,  # type: ignore[arg-type]
    )
    assert got.choices[0].message.content == want.text
    assert got.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model=model_name, messages=messages, max_tokens=16, temperature=0,  # type: ignore[arg-type]
        stream=True,
    )  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == want.text


def test_stop_strings_cut_the_text(client: openai.OpenAI, llm: LLM, model_name: str) -> None:
    full = greedy(llm, PROMPT, 24, ignore_eos=True).text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    want = full[: full.index(stop)]
    got = client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop],
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert got.choices[0].text == want
    assert got.choices[0].finish_reason == "stop"


def test_n_choices_and_seeds(client: openai.OpenAI, model_name: str) -> None:
    def sample(seed: int) -> list[str]:
        r = client.completions.create(
            model=model_name, prompt=PROMPT, max_tokens=12, temperature=1.0, top_p=0.9,
            n=3, seed=seed,
        )  # fmt: skip
        assert [c.index for c in r.choices] == [0, 1, 2]
        return [c.text for c in r.choices]

    a, b, c = sample(7), sample(7), sample(8)
    assert a == b  # a seed makes sampling reproducible
    assert a != c
    assert len(set(a)) > 1  # choices of one request differ


def test_logprobs_match_the_engine(client: openai.OpenAI, llm: LLM, model_name: str) -> None:
    want = llm.generate(
        [PROMPT], SamplingParams(max_tokens=6, temperature=0.0, logprobs=3, ignore_eos=True)
    )[0]
    got = client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    lp = got.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert len(lp.token_logprobs) == 6 and all(len(t) == 3 for t in lp.top_logprobs)
    assert want.logprobs is not None
    assert lp.token_logprobs == pytest.approx(want.logprobs, abs=1e-4)
    # Greedy picks the most likely token: its logprob is the top one.
    for mine, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert mine == pytest.approx(max(top.values()), abs=1e-5)
    chat = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
        temperature=0, logprobs=True, top_logprobs=2,
    )  # fmt: skip
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 4
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_repeated_prompts_hit_the_prefix_cache(client: openai.OpenAI, model_name: str) -> None:
    prompt = list(range(100, 180))  # 80 tokens: 4 full pages before the last token
    first = client.completions.create(model=model_name, prompt=prompt, max_tokens=4,
                                      temperature=0)  # fmt: skip
    again = client.completions.create(model=model_name, prompt=prompt, max_tokens=4,
                                      temperature=0)  # fmt: skip
    assert first.choices[0].text == again.choices[0].text
    details = again.usage.prompt_tokens_details  # type: ignore[union-attr]
    assert details is not None and details.cached_tokens == 64


def test_api_key_is_required(server: Any, model_name: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.post(server.url + "/v1/completions", headers=headers,
                       json={"model": model_name, "prompt": "x"})  # fmt: skip
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)


def test_health_and_metrics(server: Any, client: openai.OpenAI, model_name: str) -> None:
    client.completions.create(model=model_name, prompt="x", max_tokens=2)
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == model_name
    assert httpx.get(server.url + "/metrics").status_code == 401  # behind the key
    key = {"authorization": f"Bearer {API_KEY}"}
    text = httpx.get(server.url + "/metrics", headers=key).text
    for name in ("loom_instances_running", "loom_commands_queued", "loom_kv_pages_free",
                 "loom_kv_pages_used", "loom_tokens_per_second", "loom_batch_size_bucket",
                 "loom_step_seconds_bucket", "loom_generated_tokens_total"):  # fmt: skip
        assert name in text, name
    batches = [ln for ln in text.splitlines() if ln.startswith("loom_batches_total")]
    assert float(batches[0].split()[-1]) > 0


def test_a_client_that_disconnects_mid_stream_stops_its_generation(
    server: Any, model_name: str
) -> None:
    rt = server.state.runtime
    body = {"model": model_name, "prompt": PROMPT, "max_tokens": 1500, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    headers = {"Authorization": f"Bearer {API_KEY}"}
    before = rt.query(lambda: rt.stats.sampled_tokens)
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=headers) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # one chunk, then hang up
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        running = rt.query(lambda: sum(1 for i in rt.instances.values() if i.job is not None))
        if running == 0:
            break
        time.sleep(0.05)
    assert running == 0
    assert rt.query(lambda: rt.stats.sampled_tokens) - before < 1500
    # Every page is free again or held only by the prefix cache (reclaimable).
    assert rt.query(lambda: rt.pool.num_available()) == rt.pool.num_pages


def test_api_requests_share_engine_batches_with_inferlets(
    server: Any, client: openai.OpenAI, model_name: str, sdkkit_wasm: bytes
) -> None:
    from loom.client import SyncClient

    rt = server.state.runtime
    with SyncClient(server.url, API_KEY) as c:
        program = c.upload(sdkkit_wasm)
        start = rt.query(lambda: len(rt.stats.batch_sizes))
        # One forward per token, long enough to still be stepping when the completion
        # arrives: the completion is sent only once the inferlet's passes have begun.
        inst = c.launch(program, ["steps", "A long walk", "400"])
        deadline = time.monotonic() + 30
        while rt.query(lambda: len(rt.stats.batch_sizes)) < start + 2:
            assert time.monotonic() < deadline, "the inferlet never stepped"
            time.sleep(0.005)
        got = client.completions.create(model=model_name, prompt="Another prompt",
                                        max_tokens=48, temperature=0,
                                        extra_body={"ignore_eos": True})  # fmt: skip
        assert inst.wait(timeout=120).ok
    assert got.usage is not None and got.usage.completion_tokens == 48
    sizes = rt.query(lambda: list(rt.stats.batch_sizes)[start:])
    assert max(sizes) >= 2, sizes  # a batch carried the inferlet's pass and the completion


def test_a_request_arriving_during_a_generation_chunk_cuts_it_short(
    server: Any, client: openai.OpenAI, llm: LLM, model_name: str
) -> None:
    import threading

    rt = server.state.runtime
    long_prompt, short_prompt = "A long tale of", "Meanwhile, elsewhere"
    want_long = greedy(llm, long_prompt, 300, ignore_eos=True).text
    want_short = greedy(llm, short_prompt, 12, ignore_eos=True).text
    for _ in range(5):
        before = rt.query(lambda: rt.stats.nudges)
        box: dict[str, str] = {}

        def long_run(box: dict[str, str] = box) -> None:
            r = client.completions.create(
                model=model_name,
                prompt=long_prompt,
                max_tokens=300,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            box["long"] = r.choices[0].text

        t = threading.Thread(target=long_run)
        t.start()
        time.sleep(0.1)  # the long generation is in its chunks by now
        # Several arrivals during it: each cuts a chunk at another point of a page.
        for _ in range(6):
            short = client.completions.create(
                model=model_name,
                prompt=short_prompt,
                max_tokens=12,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            # Outputs are exact whether or not a chunk was cut short ...
            assert short.choices[0].text == want_short
        t.join(60)
        assert box["long"] == want_long
        if rt.query(lambda: rt.stats.nudges) > before:
            break
    else:  # ... and one was (the short request did not wait for a whole chunk).
        raise AssertionError("no generation chunk was cut short in 5 tries")
    assert rt.query(lambda: rt.pool.num_available()) == rt.pool.num_pages
