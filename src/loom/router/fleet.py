"""The engines behind a router as it sees them: load, liveness (from failures and from
probing each engine's ``/health``), and which KV receivers each engine was told about.

An engine's ``remote_send`` goes only to KV receivers it knows (``/microserving/peers``),
so the router introduces its engines to each other before the first transfer, and again
for an engine that came back (a restarted engine has a new receiver and knows no one).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

# An engine that failed a request is left out of the choices this long, unless a probe
# of its /health finds it serving again first.
DOWN_FOR_S = 5.0
PROBE_TIMEOUT_S = 2.0


@dataclass(eq=False)
class Engine:
    url: str
    index: int
    running: int = 0  # requests this router has in flight on it
    down_until: float = 0.0
    served: int = 0
    sent_bytes: int = 0
    healthy: bool = True  # the last probe of /health answered 200 (or none was made)
    error: str | None = None  # why it was last found down
    kv_addr: str | None = None  # its KV receiver, once asked
    knows: set[str] = field(default_factory=set)  # KV receivers registered with it
    retiring: bool = False  # being removed: takes no new request, finishes what it has

    @property
    def alive(self) -> bool:
        return self.healthy and not self.retiring and time.monotonic() >= self.down_until

    def mark_down(self, why: str) -> None:
        """It failed: out of the choices for a while, and unknown until it answers again."""
        self.down_until = time.monotonic() + DOWN_FOR_S
        self.error = why
        self.forget()

    def forget(self) -> None:
        """Ask it for its KV receiver and introduce it to its peers again before the next
        transfer (it may be a new process, or have lost what it was told)."""
        self.kv_addr = None
        self.knows = set()


async def probe(http: httpx.AsyncClient, engines: list[Engine]) -> None:
    """Ask every engine's ``/health`` at once; mark each up or down by its answer."""

    async def one(e: Engine) -> None:
        try:
            resp = await http.get(e.url + "/health", timeout=PROBE_TIMEOUT_S)
            why = None if resp.status_code == 200 else f"/health answered {resp.status_code}"
        except httpx.HTTPError as x:
            why = f"unreachable: {str(x) or type(x).__name__}"
        if why is None:
            e.healthy, e.error, e.down_until = True, None, 0.0
        else:
            e.healthy = False
            e.mark_down(why)

    await asyncio.gather(*(one(e) for e in engines))


async def introduce(http: httpx.AsyncClient, engines: list[Engine]) -> None:
    """Make every live engine know every live engine's KV receiver (only what is missing:
    no call at all in the steady state). Engines that do not answer are marked down."""
    live = [e for e in engines if e.alive]
    unknown = [e for e in live if e.kv_addr is None]
    if unknown:
        answers = await asyncio.gather(*(_call(http, e, "GET", {}) for e in unknown))
        for e, data in zip(unknown, answers, strict=True):
            e.kv_addr = None if data is None else str(data["recv_engine"])
    addrs = {e.kv_addr for e in live if e.kv_addr is not None}
    behind = [e for e in live if e.kv_addr is not None and addrs - e.knows]
    if not behind:
        return

    async def tell(e: Engine) -> None:
        missing = addrs - e.knows
        if await _call(http, e, "POST", {"peers": sorted(missing)}) is not None:
            e.knows |= missing

    await asyncio.gather(*(tell(e) for e in behind))


async def _call(
    http: httpx.AsyncClient, e: Engine, method: str, body: dict[str, Any]
) -> dict[str, Any] | None:
    try:
        resp = await http.request(method, e.url + "/microserving/peers", json=body or None,
                                  timeout=PROBE_TIMEOUT_S * 2)  # fmt: skip
    except httpx.HTTPError as x:
        e.mark_down(f"unreachable: {str(x) or type(x).__name__}")
        return None
    if resp.status_code != 200:
        e.mark_down(f"/microserving/peers answered {resp.status_code}: {resp.text[:200]}")
        return None
    return resp.json()  # type: ignore[no-any-return]
