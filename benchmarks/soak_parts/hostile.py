"""The hostile actors, run in a process of their own (``run``, at nice 19: an attacker's
own client work, which would be on another machine, takes as little as possible of the
server's two cores). Inferlet actors take turns in slots of ``slot_s``; bad input to the
HTTP and WebSocket APIs goes on beside them the whole time. Everything tried is tallied
by kind with how it ended; an answer the server must not give is kept as ``unexpected``."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import os
import threading
import time
from collections import Counter, defaultdict
from typing import Any

import msgpack
import websockets

from soak_parts.bad_inputs import BAD_INPUTS, Target

OUTCOMES = (  # (text in an instance's error, label)
    ("trapped", "trapped (memory cap)"),
    ("CPU budget", "CPU budget exceeded"),
    ("idle for more than", "idle timeout"),
    ("out of KV pages", "out of KV pages"),
    ("persistent exports would hold", "export quota"),
    ("redirect refused", "redirect refused"),
    ("unread messages", "unread-message cap"),
    ("engine worker died", "engine worker died"),
    ("its parent", "parent ended"),
    ("too many instances", "instance cap"),
)


class Tally:
    def __init__(self) -> None:
        self.tried: Counter[str] = Counter()
        self.outcomes: dict[str, Counter[str]] = defaultdict(Counter)
        self.unexpected: list[dict[str, Any]] = []
        self.slots: list[dict[str, Any]] = []

    def outcome(self, kind: str, label: str) -> None:
        self.outcomes[kind][label] += 1

    def bad(self, kind: str, detail: str) -> None:
        self.outcome(kind, "UNEXPECTED")
        if len(self.unexpected) < 100:
            self.unexpected.append({"kind": kind, "t": time.monotonic(), "detail": detail[:300]})

    def as_dict(self) -> dict[str, Any]:
        return {
            "tried": dict(self.tried),
            "outcomes": {k: dict(v) for k, v in self.outcomes.items()},
            "unexpected": self.unexpected,
            "slots": self.slots,
        }


def classify(status: Any) -> str:
    if status.ok:
        return "returned"
    if status.kind == "terminated":
        return "terminated by the soak"
    error = status.error or ""
    return next((label for needle, label in OUTCOMES if needle in error), error[:80])


class Act:
    """One slot of one actor: its deadline, the program, a tally, its connections and the
    instances it launched (watched for their end). ``close`` ends what the actor left
    running, whatever way it ended: one actor's turn does not run into the next one's."""

    def __init__(
        self, cfg: dict[str, Any], stop: Any, tally: Tally, slot: int, redirect_url: str
    ) -> None:
        self.cfg, self.stop, self.tally, self.slot = cfg, stop, tally, slot
        self.url, self.key, self.program = cfg["url"], cfg["api_key"], cfg["program"]
        self.redirect_url = redirect_url
        self.deadline = time.monotonic() + cfg["slot_s"]
        self.clients: list[Any] = []
        self.watched: list[tuple[Any, str, asyncio.Task[Any]]] = []  # (instance, kind, watcher)

    def over(self) -> bool:
        return bool(self.stop.is_set()) or time.monotonic() >= self.deadline

    async def until_over(self) -> None:
        while not self.over():
            await asyncio.sleep(0.1)

    async def connect(self) -> Any:
        from loom.client import Client

        client = await Client.connect(self.url, api_key=self.key)
        self.clients.append(client)
        return client

    async def launch(self, client: Any, kind: str, args: list[str]) -> Any:
        self.tally.tried[kind] += 1
        inst = await client.launch(self.program, args)
        self.watched.append((inst, kind, asyncio.create_task(self._watch(inst, kind))))
        return inst

    async def _watch(self, inst: Any, kind: str) -> Any:
        status = await inst.wait()
        self.tally.outcome(kind, classify(status))
        return status

    async def end(self, *insts: Any) -> None:
        """Terminate ``insts`` (all watched ones when none given) if they still run, give
        the watchers a moment to see the ends, and stop watching."""
        for inst in insts or [i for i, _, _ in self.watched]:
            if not inst.done:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(inst.terminate(), 30)
        tasks = [t for _, _, t in self.watched]
        if tasks:
            await asyncio.wait(tasks, timeout=20)
        for _, kind, task in self.watched:
            if not task.done():
                task.cancel()
                self.tally.outcome(kind, "end not seen")
        self.watched = []

    async def close(self) -> None:
        await self.end()
        for client in self.clients:
            with contextlib.suppress(Exception):
                await client.close()
        self.clients = []


async def page_hoarder(a: Act) -> None:
    await a.launch(await a.connect(), "page hoarder", ["hoard", "64"])
    await a.until_over()


async def fork_bomb(a: Act) -> None:
    await a.launch(await a.connect(), "fork bomb", ["bomb", a.program, "7"])
    await a.until_over()


async def launch_flood(a: Act) -> None:
    """Detached idle children until the cap refuses one; the root is then ended, the
    children left to the server's idle timeout."""
    await a.launch(await a.connect(), "child-launch flood", ["launch-flood", a.program])
    await a.until_over()


async def export_hoarder(a: Act) -> None:
    prefix = f"soak-hoard-{a.slot}-"
    c = await a.connect()
    await a.launch(c, "export hoarder", ["export-hoard", prefix])
    await a.until_over()
    await a.end()
    await unexport_all(c, a.program, prefix, a.tally)


async def unexport_all(c: Any, program: str, prefix: str, tally: Tally) -> None:
    """The hoarder's program takes its persistent exports back (they outlive instances by
    design): retried while the server refuses the launch (the instance cap, say)."""
    kind, error, deadline = "export hoarder (cleanup)", "", time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            status = await asyncio.wait_for(
                (await c.launch(program, ["unexport-all", prefix])).wait(), 60
            )
            if status.ok:
                tally.outcome(kind, "unexported")
                return
            error = str(status.error)
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        await asyncio.sleep(1)
    tally.bad(kind, f"unexport-all failed for 120 s: {error}")


async def memory_hog(a: Act) -> None:
    c = await a.connect()
    while not a.over():
        inst = await a.launch(c, "memory hog", ["grow"])
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(inst.wait(), max(0.1, a.deadline - time.monotonic()))
        await a.end()
        await asyncio.sleep(0.2)


async def cpu_spinner(a: Act) -> None:
    c = await a.connect()
    for _ in range(2):
        await a.launch(c, "CPU spinner", ["spin"])
    await a.until_over()


async def _raw_launch(a: Act, args: list[str], max_queue: int | None) -> Any:
    ws = await websockets.connect(
        a.url.replace("http://", "ws://") + "/v1/ws", max_size=16 << 20, max_queue=max_queue
    )
    for frame in (
        {"type": "hello", "id": 1, "version": 1, "api_key": a.key},
        {"type": "launch", "id": 2, "program": a.program, "args": args},
    ):
        await ws.send(msgpack.packb(frame))
        reply = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 60), raw=False)
        if reply.get("type") != "ok":
            await ws.close()
            raise RuntimeError(f"{frame['type']} refused: {reply.get('message')}")
    return ws, reply["instance"]


async def message_flood(a: Act) -> None:
    """A flood of messages to a client that reads them all (and throws them away)."""
    kind = "message flood (reading client)"
    a.tally.tried[kind] += 1
    ws, iid = await _raw_launch(a, ["flood"], max_queue=None)
    n, ended = 0, ""
    try:
        while not a.over() and not ended:
            with contextlib.suppress(asyncio.TimeoutError):
                frame = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 0.5), raw=False)
                n += 1
                if frame.get("event") in ("result", "error", "terminated"):
                    ended = str(frame.get("data"))[:80]
        if not ended:
            await ws.send(msgpack.packb({"type": "terminate", "id": 3, "instance": iid}))
        a.tally.outcome(kind, f"ended: {ended}" if ended else "read, then terminated")
    finally:
        await ws.close()
    a.tally.outcomes[kind]["messages read"] += n


async def slow_reader_flood(a: Act) -> None:
    """A flood of messages to a client that never reads, then vanishes (the server must
    neither buffer without bound nor keep the instance)."""
    a.tally.tried["message flood (client never reads)"] += 1
    ws, _ = await _raw_launch(a, ["flood"], max_queue=1)
    await a.until_over()
    ws.transport.abort()  # gone without a word
    a.tally.outcome("message flood (client never reads)", "client vanished")


async def pull_then_die(a: Act) -> None:
    kind = "pull, then die"
    c, i = await a.connect(), 0
    while not a.over():
        channel = f"soak-chan-{a.slot}-{i}"
        i += 1
        for _ in range(3):
            await a.launch(c, kind, ["pull", channel])
        await asyncio.sleep(0.5)
        await a.end()
        await asyncio.wait_for((await c.launch(a.program, ["push", channel, "m"])).wait(), 60)
        reader = await c.launch(a.program, ["pull", channel])
        try:
            status = await asyncio.wait_for(reader.wait(), 30)
            got = await reader.recv() if status.ok else status.error
        except TimeoutError:
            got = "no message within 30 s"
            with contextlib.suppress(Exception):
                await reader.terminate()
        if got != "pulled m":
            a.tally.bad(kind, f"the next reader got {got!r}")


async def idle_vanish(a: Act) -> None:
    """Idle instances whose client disconnects: only the server's idle timeout ends them."""
    from loom.client import Client

    async with await Client.connect(a.url, api_key=a.key) as c:  # (not the Act's: not ended)
        for _ in range(8):
            a.tally.tried["idle forever, client gone"] += 1
            await c.launch(a.program, ["idle"])
    a.tally.outcome("idle forever, client gone", "left to the idle timeout")
    await a.until_over()


async def http_redirect(a: Act) -> None:
    kind = "HTTP redirect off the allow-list"
    c = await a.connect()
    while not a.over():
        inst = await c.launch(a.program, ["http", a.redirect_url])
        a.tally.tried[kind] += 1
        status = await asyncio.wait_for(inst.wait(), 60)
        if status.ok or "redirect refused" not in (status.error or ""):
            a.tally.bad(kind, f"{status.kind}: {status.error}")
        else:
            a.tally.outcome(kind, "redirect refused")
        await asyncio.sleep(0.3)


ACTORS = {
    "page-hoarder": page_hoarder,
    "fork-bomb": fork_bomb,
    "launch-flood": launch_flood,
    "export-hoarder": export_hoarder,
    "memory-hog": memory_hog,
    "cpu-spinner": cpu_spinner,
    "message-flood": message_flood,
    "slow-reader-flood": slow_reader_flood,
    "pull-then-die": pull_then_die,
    "idle-vanish": idle_vanish,
    "http-redirect": http_redirect,
}


class _Redirect(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # a redirect to a host the allow-list lacks
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(302)
        port = self.server.server_address[1]  # type: ignore[index]
        self.send_header("location", f"http://localhost:{port!s}/secret")
        self.end_headers()

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-length", "10")
        self.end_headers()
        self.wfile.write(b"the secret")

    def log_message(self, *args: Any) -> None:
        pass


class _Either:
    """Set when any of ``events`` is."""

    def __init__(self, *events: Any) -> None:
        self.events = events

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)


async def rotation(cfg: dict[str, Any], stop: Any, tally: Tally, redirect_url: str) -> None:
    """Each actor in turn, ``slot_s`` each, until ``stop`` (or ``rounds`` rounds, if set)."""
    names, slot = cfg["actors"], 0
    while names and not stop.is_set():
        if cfg.get("rounds") and slot >= cfg["rounds"] * len(names):
            return
        name = names[slot % len(names)]
        t0 = time.monotonic()
        act = Act(cfg, stop, tally, slot, redirect_url)
        try:
            await asyncio.wait_for(ACTORS[name](act), cfg["slot_s"] + 90)
        except Exception as e:
            tally.outcome(f"{name} (actor)", f"failed: {type(e).__name__}: {e}"[:120])
            await act.until_over()  # the slot is the actor's all the same
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(act.close(), 90)
        tally.slots.append({"actor": name, "start": t0, "end": time.monotonic()})
        slot += 1


async def bad_input_loop(cfg: dict[str, Any], stop: Any, tally: Tally) -> None:
    target = Target(cfg["url"], cfg["api_key"], cfg["model"])
    kinds = list(BAD_INPUTS)
    i = 0
    while kinds and not stop.is_set():
        kind = kinds[i % len(kinds)]
        i += 1
        tally.tried[kind] += 1
        try:
            ok, detail = await asyncio.wait_for(BAD_INPUTS[kind](target), 90)
        except Exception as e:
            ok, detail = False, f"{type(e).__name__}: {e}"
        if ok:
            tally.outcome(kind, detail)
        elif "engine worker died" in detail:  # the soak's kill: as documented
            tally.outcome(kind, "failed by the worker kill")
        else:
            tally.bad(kind, detail)
        await asyncio.sleep(cfg["bad_input_interval_s"])


async def _main(cfg: dict[str, Any], stop: Any) -> dict[str, Any]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Redirect)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    redirect_url = f"http://127.0.0.1:{httpd.server_address[1]}/redirect"
    tally = Tally()
    rounds_done = threading.Event()
    stop = _Either(stop, rounds_done)

    async def turns() -> None:
        await rotation(cfg, stop, tally, redirect_url)
        rounds_done.set()  # (bad input goes on while actors do)

    try:
        await asyncio.gather(turns(), bad_input_loop(cfg, stop, tally))
        if "export-hoarder" in cfg["actors"]:  # (what a hoarder cut short left behind)
            from loom.client import Client

            async with await Client.connect(cfg["url"], api_key=cfg["api_key"]) as c:
                await unexport_all(c, cfg["program"], "soak-hoard-", tally)
    finally:
        httpd.shutdown()
    return tally.as_dict()


def run(cfg: dict[str, Any], stop: Any, out: Any) -> None:
    """The hostile process: runs until ``stop`` (an Event) is set, or ``cfg["rounds"]``
    rounds of the actors are over, then puts its tally on ``out``."""
    os.nice(19)
    out.put(asyncio.run(_main(cfg, stop)))
