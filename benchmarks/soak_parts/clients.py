"""The well-behaved clients: closed loops, each taking its turn at the three kinds of
request (a streamed chat completion, a non-streamed completion, an inferlet launched over
the WebSocket protocol), every request recorded with its times and outcome."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import httpx

KINDS = ("stream", "complete", "inferlet")


@dataclass
class Record:
    kind: str
    client: int
    start: float  # time.monotonic()
    end: float
    ok: bool
    error: str | None = None
    ttft: float | None = None  # streams: time to the first token's chunk
    tokens: int = 0

    @property
    def latency(self) -> float:
        return self.end - self.start

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class WellBehaved:
    """``concurrency`` clients, each sending its next request ``think_s`` after the last
    one's answer; ``stop`` ends them after their request in flight."""

    def __init__(
        self,
        url: str,
        api_key: str,
        model: str,
        program: str,
        concurrency: int,
        max_tokens: int,
        think_s: float,
        timeout_s: float,
    ) -> None:
        self.url, self.api_key, self.model, self.program = url, api_key, model, program
        self.concurrency, self.max_tokens = concurrency, max_tokens
        self.think_s, self.timeout_s = think_s, timeout_s
        self.records: list[Record] = []
        self.stop = asyncio.Event()

    async def run(self) -> None:
        await asyncio.gather(*(self._client(i) for i in range(self.concurrency)))

    async def burst(self, rounds: int) -> list[Record]:
        """``rounds`` requests of every kind, one after another (the check after the soak)."""
        out = []
        async with httpx.AsyncClient(
            base_url=self.url,
            timeout=self.timeout_s,
            headers={"authorization": f"Bearer {self.api_key}"},
        ) as http:
            ws: list[Any] = [None]
            try:
                for i in range(rounds):
                    for kind in KINDS:
                        out.append(await self._one(http, ws, kind, -1, i))
            finally:
                if ws[0] is not None:
                    await ws[0].close()
        return out

    async def _client(self, idx: int) -> None:
        async with httpx.AsyncClient(
            base_url=self.url,
            timeout=self.timeout_s,
            headers={"authorization": f"Bearer {self.api_key}"},
        ) as http:
            ws: list[Any] = [None]  # the client's WebSocket connection, made when first needed
            i = idx
            try:
                while not self.stop.is_set():
                    self.records.append(await self._one(http, ws, KINDS[i % len(KINDS)], idx, i))
                    i += 1
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self.stop.wait(), self.think_s)
            finally:
                if ws[0] is not None:
                    await ws[0].close()

    async def _one(
        self, http: httpx.AsyncClient, ws: list[Any], kind: str, idx: int, i: int
    ) -> Record:
        prompt = f"Client {idx} request {i}: tell me a story about the river and the old mill."
        rec = Record(kind, idx, time.monotonic(), 0.0, False)
        try:
            if kind == "stream":
                job = self._stream(http, prompt, rec)
            elif kind == "complete":
                job = self._complete(http, prompt, rec)
            else:
                job = self._inferlet(ws, prompt, rec)
            await asyncio.wait_for(job, self.timeout_s)
        except TimeoutError:
            rec.error = f"no answer within {self.timeout_s:g} s"
        except Exception as e:
            rec.error = f"{type(e).__name__}: {e}"[:300]
            if kind == "inferlet" and ws[0] is not None:  # a broken connection: a new one
                with contextlib.suppress(Exception):
                    await ws[0].close()
                ws[0] = None
        rec.end = time.monotonic()
        rec.ok = rec.error is None
        return rec

    async def _stream(self, http: httpx.AsyncClient, prompt: str, rec: Record) -> None:
        body = {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "messages": [{"role": "user", "content": prompt}],
        }
        finish, done = None, False
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                rec.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    rec.error = f"stream error: {chunk['error']}"[:300]
                    return
                choice = chunk["choices"][0]
                delta = choice.get("delta") or {}
                if rec.ttft is None and "content" in delta and "role" not in delta:
                    rec.ttft = time.monotonic() - rec.start
                finish = choice.get("finish_reason") or finish
        if not done or finish != "length":
            rec.error = f"stream ended without [DONE] or finish_reason length ({finish})"
            return
        rec.tokens = self.max_tokens

    async def _complete(self, http: httpx.AsyncClient, prompt: str, rec: Record) -> None:
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
        r = await http.post("/v1/completions", json=body)
        if r.status_code != 200:
            rec.error = f"HTTP {r.status_code}: {r.text[:200]}"
            return
        tokens = r.json()["usage"]["completion_tokens"]
        if tokens != self.max_tokens:
            rec.error = f"{tokens} tokens, not {self.max_tokens}"
            return
        rec.tokens = tokens

    async def _inferlet(self, ws: list[Any], prompt: str, rec: Record) -> None:
        from loom.client import Client

        if ws[0] is None:
            ws[0] = await Client.connect(self.url, api_key=self.api_key)
        inst = await ws[0].launch(self.program, [prompt, str(self.max_tokens), "fast", "ignore"])
        try:
            status = await inst.wait()
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await inst.terminate()
            raise
        if not status.ok:
            rec.error = f"inferlet {status.kind}: {status.error}"[:300]
            return
        rec.tokens = self.max_tokens


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100); None for no values."""
    if not values:
        return None
    s = sorted(values)
    rank = max(1, -(-len(s) * q // 100))  # ceil(n q / 100)
    return s[int(rank) - 1]


def latency_stats(records: list[Record]) -> dict[str, Any]:
    """Count, p50/p90/p99/max of latency (ms) and p50/p99 of TTFT (ms, streams)."""
    lat = [1000 * r.latency for r in records]
    ttft = [1000 * r.ttft for r in records if r.ttft is not None]
    return {
        "n": len(records),
        "p50_ms": percentile(lat, 50),
        "p90_ms": percentile(lat, 90),
        "p99_ms": percentile(lat, 99),
        "max_ms": max(lat) if lat else None,
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p99_ms": percentile(ttft, 99),
    }
