"""Built-in routing strategies, each a short program of sub-request calls.

A ``Strategy`` is what ``StrategyRouter.translate_request`` runs; swapping the object
(``/admin/strategy``) changes how new requests are served without touching the engines.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Any

from loom.router.router import Engine, RoutedRequest, Router

Chunks = AsyncIterator[dict[str, Any]]


class Strategy:
    name = "base"

    def run(self, router: Router, req: RoutedRequest) -> Chunks:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name}


class DataParallel(Strategy):
    """Each request on the least-loaded engine, which prefills and decodes it."""

    name = "dp"

    async def run(self, router: Router, req: RoutedRequest) -> Chunks:
        async for chunk in router.start_generate(router.least_loaded(), req, begin=0):
            yield chunk


class PrefillDecode(Strategy):
    """Engine 0 prefills, the others decode. The decode engine reserves slots for
    ``prompt[matched:end]`` (its prefix cache covers ``[0:matched]``), the prefill engine
    computes and pushes them, the decode engine generates from ``end`` on.

    ``balance`` f > 0 moves the last f of the prompt to the decode engine (``end =
    (1-f)·len``), which prefills it itself: for when the prefill engine is the bottleneck.
    ``bypass_below`` > 0 skips the prefill engine when the decode engine's cache leaves
    fewer than that many tokens of ``[0:end]`` uncovered (the decode engine prefills
    them); with 0 the prefill engine is skipped only when nothing is left to send."""

    name = "pd"

    def __init__(self, balance: float = 0.0, bypass_below: int = 0, prefill: int = 1) -> None:
        if not 0.0 <= balance < 1.0:
            raise ValueError("balance must lie in [0, 1)")
        self.balance, self.bypass_below, self.prefill = balance, bypass_below, prefill

    def roles(self, router: Router) -> tuple[list[Engine], list[Engine]]:
        engines = router.engines
        if len(engines) <= self.prefill:  # one engine: it plays both roles
            return engines, engines
        return engines[: self.prefill], engines[self.prefill :]

    def split(self, n: int) -> int:
        """Where the decode engine takes over: ``end`` with 0 <= end < n."""
        if self.balance <= 0:
            return n - 1
        return max(0, min(n - 1, int((1.0 - self.balance) * n)))

    async def run(self, router: Router, req: RoutedRequest) -> Chunks:
        prefill, decode = self.roles(router)
        if not router.live_engines(decode):
            decode = prefill  # any engine can take any role
        d = router.least_loaded(decode)
        end = self.split(len(req.prompt))
        # Nothing to prefill remotely, or no prefill engine up: the decode engine does it all.
        if end == 0 or not router.live_engines(prefill):
            async for chunk in router.start_generate(d, req, begin=0):
                yield chunk
            return
        addr, matched, recv = await router.prep_recv(d, req, end)
        req.matched = matched
        begin = end
        try:
            if end - matched <= self.bypass_below:
                begin = matched  # the decode engine's cache covers enough: skip prefill
            elif matched < end:
                p = router.least_loaded(prefill)
                req.prefill_engine = p.index
                await router.remote_send(p, req, matched, end, addr, recv)
        except BaseException:
            await router.abort(d, req)  # free the reservation now rather than at expiry
            raise
        async for chunk in router.start_generate(d, req, begin=begin):
            yield chunk

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "balance": self.balance, "bypass_below": self.bypass_below}


class PrefixAwarePD(PrefillDecode):
    """P/D that sends a request to the decode engine holding most of its prompt and
    skips the prefill engine when that engine's cache leaves under ``bypass_below``
    tokens to compute (it prefills them itself)."""

    name = "prefix-pd"

    def __init__(self, balance: float = 0.0, bypass_below: int = 64, prefill: int = 1) -> None:
        super().__init__(balance, bypass_below, prefill)


class ContextMigration(Strategy):
    """Requests that share a context (their first ``context_len`` tokens) go to the
    engine holding that context's KV. When that engine is busier than another by
    ``imbalance`` requests, the context's KV is copied to the less loaded engine first
    (``prep_recv`` there, ``remote_send`` from the holder, a one-token ``start_generate``
    to commit it to the receiver's prefix cache), and the context moves with it."""

    name = "migrate"

    def __init__(self, context_len: int = 256, imbalance: int = 2) -> None:
        self.context_len, self.imbalance = context_len, imbalance
        self.owner: dict[str, int] = {}  # context key -> engine index
        self.migrations = 0

    def key(self, req: RoutedRequest) -> str | None:
        if len(req.prompt) <= self.context_len:
            return None
        head = ",".join(map(str, req.prompt[: self.context_len])).encode()
        return hashlib.blake2b(head, digest_size=12).hexdigest()

    async def run(self, router: Router, req: RoutedRequest) -> Chunks:
        key = self.key(req)
        target = router.least_loaded()
        if key is not None:
            owner_index = self.owner.get(key)
            owner = router.engine(owner_index) if owner_index is not None else None
            if owner is not None and owner.alive:
                if owner.running - target.running >= self.imbalance and target is not owner:
                    await migrate(
                        router,
                        req.prompt[: self.context_len],
                        owner,
                        target,
                        f"{req.request_id}-migrate",
                    )
                    self.migrations += 1
                else:
                    target = owner
            self.owner[key] = target.index
        async for chunk in router.start_generate(target, req, begin=0):
            yield chunk

    def describe(self) -> dict[str, Any]:
        return {
            "strategy": self.name,
            "context_len": self.context_len,
            "contexts": len(self.owner),
            "migrations": self.migrations,
        }


async def migrate(
    router: Router, context: list[int], src: Engine, dst: Engine, request_id: str
) -> int:
    """Copy the KV of ``context`` from ``src`` to ``dst``'s prefix cache; returns bytes."""
    req = RoutedRequest(
        list(context), request_id, {"max_tokens": 1, "temperature": 0, "ignore_eos": True}
    )
    end = len(context) - 1
    addr, matched, recv = await router.prep_recv(dst, req, end)
    try:
        if matched < end:
            await router.remote_send(src, req, matched, end, addr, recv)
    except BaseException:
        await router.abort(dst, req)
        raise
    async for _ in router.start_generate(dst, req, begin=end):
        pass  # one token: commits the context to dst's prefix cache
    return req.transferred_bytes


class Dynamic(Strategy):
    """Chooses per request from live signals: short prompts (under ``short``) and a
    single live engine go data parallel; longer ones go prefix-aware P/D, with the
    balance factor raised while the prefill engine is busier than the decode engines."""

    name = "dynamic"

    def __init__(self, short: int = 128) -> None:
        self.short = short
        self.dp = DataParallel()
        self.pd = {f: PrefixAwarePD(balance=f) for f in (0.0, 0.1, 0.3)}
        self.choices: dict[str, int] = {}

    def choose(self, router: Router, req: RoutedRequest) -> Strategy:
        live = router.live_engines()
        if len(live) < 2 or len(req.prompt) < self.short:
            return self.dp
        prefill_load = router.engines[0].running
        decode_load = min(e.running for e in router.engines[1:])
        f = 0.3 if prefill_load > decode_load + 2 else 0.1 if prefill_load > decode_load else 0.0
        return self.pd[f]

    async def run(self, router: Router, req: RoutedRequest) -> Chunks:
        choice = self.choose(router, req)
        label = choice.name if choice is self.dp else f"{choice.name}@{choice.balance}"  # type: ignore[attr-defined]
        self.choices[label] = self.choices.get(label, 0) + 1
        async for chunk in choice.run(router, req):
            yield chunk

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "short": self.short, "choices": dict(self.choices)}


def make_strategy(name: str, balance: float = 0.0, **options: Any) -> Strategy:
    """A built-in strategy by name: dp, pd, balanced-pd, prefix-pd, migrate, dynamic."""
    if name == "dp":
        return DataParallel()
    if name == "pd":
        return PrefillDecode(balance=balance)
    if name == "balanced-pd":
        return PrefillDecode(balance=balance or 0.1)
    if name == "prefix-pd":
        return PrefixAwarePD(balance=balance, **options)
    if name == "migrate":
        return ContextMigration(**options)
    if name == "dynamic":
        return Dynamic(**options)
    raise ValueError(
        f"unknown strategy {name!r} (dp, pd, balanced-pd, prefix-pd, migrate, dynamic)"
    )


STRATEGIES = ("dp", "pd", "balanced-pd", "prefix-pd", "migrate", "dynamic")


class StrategyRouter(Router):
    """A router whose ``translate_request`` runs a replaceable ``Strategy``."""

    def __init__(
        self, engine_urls: list[str], strategy: Strategy | None = None, api_key: str | None = None
    ) -> None:
        super().__init__(engine_urls, api_key=api_key)
        self.strategy = strategy or DataParallel()

    async def translate_request(self, req: RoutedRequest) -> Chunks:
        async for chunk in self.strategy.run(self, req):
            yield chunk
