"""Microserving strategies over real engine processes: outputs equal a plain greedy run,
transferred bytes follow the KV size formula, and no page is left held."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from loom import SamplingParams
from loom.router.router import RoutedRequest, Router, RouterError
from loom.router.strategies import (
    ContextMigration,
    DataParallel,
    PrefillDecode,
    PrefixAwarePD,
    StrategyRouter,
    migrate,
)
from tests.helpers import kv_bytes_per_token

GREEDY = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}


def prompt(seed: int, n: int) -> list[int]:
    return [(seed * 7919 + i * 104729) % 1800 + 100 for i in range(n)]


def reference(llm: Any, p: list[int]) -> str:
    out = llm.generate([p], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    return str(out[0].text)


async def run(router: Router, p: list[int], rid: str) -> tuple[str, RoutedRequest]:
    req = RoutedRequest(list(p), rid, dict(GREEDY))
    text = []
    async for chunk in router.handle(req):
        text += [c.get("text") or "" for c in chunk.get("choices", [])]
    return "".join(text), req


def pages_held(url: str) -> int:
    """KV pages held by anything but the prefix cache (which gives them back on demand)."""
    values = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(("loom_kv_pages_used ", "loom_kv_pages_cached ")):
            name, value = line.split()
            values[name] = float(value)
    return int(values["loom_kv_pages_used"] - values["loom_kv_pages_cached"])


def test_every_strategy_gives_the_greedy_output(
    engines: list[Any], llm: Any, tiny_dir: Any
) -> None:
    urls = [e.url for e in engines]
    prompts = [prompt(s, n) for s, n in ((1, 70), (2, 33), (3, 100), (4, 17))]
    want = [reference(llm, p) for p in prompts]
    per_token = kv_bytes_per_token(tiny_dir)

    async def scenario() -> None:
        router = StrategyRouter(urls)
        try:
            for strategy in (
                DataParallel(),
                PrefillDecode(),
                PrefillDecode(balance=0.1),
                PrefillDecode(balance=0.3),
                PrefillDecode(balance=0.6),
            ):
                router.strategy = strategy
                sent = 0
                for k, p in enumerate(prompts):
                    # A fresh first token per strategy: the decode engine's prefix cache
                    # holds nothing of the prompt, so every P/D run transfers.
                    q = [1500 + 10 * len(str(strategy.describe())) + k, *p]
                    text, req = await run(router, q, f"{strategy.name}-{k}-{strategy.describe()}")
                    assert text == reference(llm, q), (strategy.describe(), k)
                    if isinstance(strategy, PrefillDecode):
                        end = strategy.split(len(q))
                        assert req.decode_engine == 1
                        assert req.prefill_engine == (0 if end > req.matched else None)
                        assert req.transferred_bytes == (end - req.matched) * per_token
                    else:
                        assert req.transferred_bytes == 0
                    sent += req.transferred_bytes
                assert sent > 0 or not isinstance(strategy, PrefillDecode)
            assert want  # the prompts themselves, once more, through P/D with end = -1
            router.strategy = PrefillDecode()
            for k, (p, w) in enumerate(zip(prompts, want, strict=True)):
                text, req = await run(router, p, f"pd-plain-{k}")
                assert text == w
        finally:
            await router.close()

    asyncio.run(scenario())
    for url in urls:
        assert pages_held(url) == 0


def test_prefix_aware_pd_bypasses_the_prefill_engine_on_a_cache_hit(
    engines: list[Any], llm: Any
) -> None:
    urls = [e.url for e in engines]
    document = prompt(11, 96)

    async def scenario() -> None:
        router = StrategyRouter(urls, PrefixAwarePD(bypass_below=32))
        try:
            first = [*document, 5, 6, 7]
            text, req = await run(router, first, "doc-q1")
            assert text == reference(llm, first)
            assert req.transferred_bytes > 0 and req.prefill_engine == 0
            # Same document, another question: the decode engine's cache covers it.
            second = [*document, 8, 9, 10, 11]
            text, req = await run(router, second, "doc-q2")
            assert text == reference(llm, second)
            assert req.matched == 96 and req.transferred_bytes == 0
            assert req.prefill_engine is None  # bypassed
        finally:
            await router.close()

    asyncio.run(scenario())
    for url in urls:
        assert pages_held(url) == 0


def test_context_migration_copies_kv_and_keeps_outputs(
    engines: list[Any], llm: Any, tiny_dir: Any
) -> None:
    urls = [e.url for e in engines]
    context = prompt(21, 64)

    async def scenario() -> None:
        router = StrategyRouter(urls)
        try:
            src, dst = router.engines
            # The context lives on src first.
            text, _ = await run(router, [*context, 1], "warm")  # dp: least loaded = src
            sent = await migrate(router, context, src, dst, "mig-1")
            assert sent == 63 * kv_bytes_per_token(tiny_dir)  # the whole context but its last
            router.strategy = ContextMigration(context_len=32)
            q = [*context, 42, 43]
            router.strategy.owner[router.strategy.key(RoutedRequest(q, "k")) or ""] = 1
            text, req = await run(router, q, "after-migration")
            assert text == reference(llm, q)
            assert req.decode_engine == 1
        finally:
            await router.close()

    asyncio.run(scenario())
    # The migrated context is in dst's prefix cache: a request there finds it.
    model = httpx.get(urls[1] + "/v1/models").json()["data"][0]["id"]
    r = httpx.post(
        urls[1] + "/v1/completions",
        json={
            "model": model,
            "prompt": [*context, 99],
            "max_tokens": 1,
        },
    )
    assert r.status_code == 200
    # All 64 context tokens: 63 received, the last fed by migrate's one-token generation.
    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 64
    for url in urls:
        assert pages_held(url) == 0


def test_a_dead_engine_makes_the_router_retry_elsewhere(engines: list[Any], llm: Any) -> None:
    dead = "http://127.0.0.1:9"  # nothing listens on the discard port
    p = prompt(31, 40)

    async def scenario() -> None:
        router = StrategyRouter([dead, engines[1].url], DataParallel())
        try:
            text, req = await run(router, p, "retry-1")
            assert text == reference(llm, p)
            assert req.attempt == 1 and req.decode_engine == 1
            assert not router.engines[0].alive
            # P/D with the prefill engine down: the decode engine does it all.
            router.strategy = PrefillDecode()
            text, req = await run(router, [*p, 3], "retry-2")
            assert text == reference(llm, [*p, 3]) and req.transferred_bytes == 0
        finally:
            await router.close()

    asyncio.run(scenario())


def test_no_engine_up_is_a_clear_error() -> None:
    async def scenario() -> None:
        router = StrategyRouter(["http://127.0.0.1:9"], DataParallel())
        try:
            with pytest.raises(RouterError, match="attempts"):
                await run(router, [1, 2, 3], "nowhere")
        finally:
            await router.close()

    asyncio.run(scenario())


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no metric {name}")


def test_a_client_that_goes_away_mid_transfer_frees_the_reservation(engines: list[Any]) -> None:
    urls = [e.url for e in engines]

    async def scenario() -> None:
        router = StrategyRouter(urls, PrefillDecode())
        reserved = asyncio.Event()

        async def slow_prefill(*args: Any, **kw: Any) -> dict[str, Any]:
            reserved.set()  # prep_recv is done: the decode engine holds a reservation
            await asyncio.sleep(3600)
            return {}

        router.remote_send = slow_prefill  # type: ignore[method-assign]
        try:
            task = asyncio.create_task(run(router, prompt(41, 80), "gone-1"))
            await reserved.wait()
            assert metric(urls[1], "loom_kv_reservations") == 1
            task.cancel()  # the client disconnects
            with pytest.raises(asyncio.CancelledError):
                await task
            assert metric(urls[1], "loom_kv_reservations") == 0
        finally:
            await router.close()

    asyncio.run(scenario())
    assert pages_held(urls[1]) == 0
