"""API keys on HTTP routes (``Authorization: Bearer KEY`` when the server has keys), and
the limit on failed key checks per client address, shared with the WebSocket ``hello``."""

from __future__ import annotations

import time
from collections import deque

from fastapi import Request

from loom.api.errors import ApiError


class FailedAuthLimit:
    """After ``per_minute`` failed key checks within a minute, an address is refused
    without a check until a minute has passed since its oldest counted failure: guessing
    keys costs time. (Behind a proxy every client shares the proxy's address.)"""

    WINDOW_S = 60.0

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._failures: dict[str, deque[float]] = {}

    def wait_s(self, address: str) -> float:
        """Seconds until ``address`` may try again (0: now)."""
        failures = self._failures.get(address)
        if failures is None:
            return 0.0
        now = time.monotonic()
        while failures and failures[0] <= now - self.WINDOW_S:
            failures.popleft()
        if not failures:
            del self._failures[address]
            return 0.0
        if len(failures) < self.per_minute:
            return 0.0
        return failures[0] + self.WINDOW_S - now

    def failed(self, address: str) -> None:
        if len(self._failures) > 100_000:  # many addresses: forget those without a failure
            for addr in list(self._failures):
                self.wait_s(addr)
        self._failures.setdefault(address, deque()).append(time.monotonic())


def refusal(wait_s: float) -> str:
    return f"too many failed authentications from this address; try again in {wait_s:.0f} s"


async def require_key(request: Request) -> None:
    state = request.app.state.loom
    if not state.config.server.api_keys:
        return
    address = request.client.host if request.client else ""
    wait_s = state.auth_limit.wait_s(address)
    if wait_s:
        raise ApiError(429, refusal(wait_s), code="too_many_failed_authentications",
                       kind="rate_limit_error",
                       headers={"Retry-After": f"{wait_s:.0f}"})  # fmt: skip
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not state.check_key(key.strip()):
        state.auth_limit.failed(address)
        raise ApiError(
            401,
            "missing or wrong API key (send 'Authorization: Bearer KEY')",
            code="invalid_api_key",
            kind="authentication_error",
        )
