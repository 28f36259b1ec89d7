"""Engines joining and leaving a router at run time (by URL and from a placement), the
scaling policy, inferlets run through the router on its engines, and the KV transport
chosen by where the receiver is."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.router.conftest import serve_in_thread


@pytest.fixture(scope="module")
def router_app(engines: list[Any], tiny_dir: Path) -> Iterator[tuple[Any, str]]:
    from loom.models.tokenizer import Tokenizer
    from loom.router.app import create_router_app
    from loom.router.strategies import StrategyRouter

    model = httpx.get(engines[0].url + "/v1/models").json()["data"][0]["id"]
    router = StrategyRouter([e.url for e in engines], make_dp())
    app = create_router_app(router, Tokenizer.from_dir(tiny_dir), model)
    server, url = serve_in_thread(app)
    yield router, url
    server.should_exit = True


def make_dp() -> Any:
    from loom.router.strategies import make_strategy

    return make_strategy("dp")


def run_events(url: str, program: str, args: list[str]) -> list[tuple[str | None, Any]]:
    events, kind = [], None
    with httpx.stream("POST", url + "/v1/inferlets/run", timeout=120,
                      json={"program": program, "args": args}) as r:  # fmt: skip
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
    return events


def test_inferlets_run_on_the_engines_and_reach_late_joiners(
    router_app: tuple[Any, str], engines: list[Any], sdkkit_wasm: bytes, tiny_dir: Path
) -> None:
    from loom.router.engines import spawn_engine, wait_ready

    router, url = router_app
    r = httpx.post(url + "/v1/programs", content=sdkkit_wasm, timeout=120)
    assert r.status_code == 200, r.text
    program = r.json()["program"]
    assert r.json()["replicas"] == 2
    events = run_events(url, program, ["fast", "Once upon", "5"])
    assert [k for k, _ in events] == ["launched", "message", "result"]
    assert len(json.loads(events[1][1])["tokens"]) > 0
    unknown = httpx.post(url + "/v1/inferlets/run", json={"program": "f" * 64}, timeout=10)
    assert unknown.status_code == 404 and "upload" in unknown.json()["error"]["message"]
    assert httpx.post(url + "/v1/programs", content=b"", timeout=10).status_code == 400

    # An engine that joins later (by URL) gets the program on its first launch: with the
    # first two removed, launches can only go there.
    late = spawn_engine(str(tiny_dir), [], quiet=True)
    try:
        wait_ready(late, time.monotonic() + 120)
        added = httpx.post(url + "/admin/engines", json={"url": late.url}, timeout=30)
        assert added.status_code == 200, added.text
        dead = httpx.post(url + "/admin/engines", json={"url": "http://127.0.0.1:9"}, timeout=30)
        assert dead.status_code == 400 and "health" in dead.json()["error"]["message"]
        for e in engines:
            gone = httpx.delete(url + "/admin/engines", params={"url": e.url}, timeout=60)
            assert gone.status_code == 200, gone.text
        assert [e["url"] for e in httpx.get(url + "/admin/engines").json()["engines"]] == [late.url]
        last = httpx.delete(url + "/admin/engines", params={"url": late.url}, timeout=60)
        assert last.status_code == 409  # a router keeps one engine
        events = run_events(url, program, ["fast", "Once upon", "5"])
        assert [k for k, _ in events] == ["launched", "message", "result"]
        # Engines started elsewhere are only left, never stopped.
        assert all(httpx.get(e.url + "/health").status_code == 200 for e in engines)
    finally:
        for e in engines:
            if not any(x.url == e.url for x in router.engines):
                router.add_engine(e.url)
        for x in [x for x in router.engines if x.url == late.url]:
            router.engines.remove(x)
        late.stop()


def test_inferlet_protocol_through_the_router(
    router_app: tuple[Any, str], sdkkit_wasm: bytes
) -> None:
    from loom.client import Client
    from loom.client.client import ClientError

    router, url = router_app

    async def scenario() -> None:
        async with await Client.connect(url) as c:
            assert c.info["server"].startswith("loom router")
            program = await c.upload(sdkkit_wasm)
            assert await c.has_program(program)
            insts = [await c.launch(program, ["echo"]) for _ in range(4)]
            # Each running instance counts as its replica's load: the launches alternate.
            assert len({i.id.split("-")[0] for i in insts}) == 2
            for inst in insts:
                assert await inst.recv() == "ready"
            assert {i.id for i in insts} <= {r["id"] for r in await c.list()}
            for k, inst in enumerate(insts):
                await inst.send(f"m{k}")
                assert await inst.recv() == f"echo:m{k}"
                assert (await inst.wait()).ok
            # Another connection reaches an instance this one launched.
            waiting = await c.launch(program, ["echo"])
            assert await waiting.recv() == "ready"
            async with await Client.connect(url) as other:
                await other.terminate(waiting.id)
                with pytest.raises(ClientError, match="unknown_instance"):
                    await other.terminate("99-nope")
            assert (await waiting.wait()).kind == "terminated"
            with pytest.raises(ClientError, match="unknown_program"):
                await c.launch("0" * 64)
        assert all(e.running == 0 for e in router.engines)

    asyncio.run(scenario())


def test_scaling_by_queue_length_and_restarts_of_local_engines(tiny_dir: Path) -> None:
    from loom.router.manage import EngineManager
    from loom.router.placement import LocalPlacement
    from loom.router.router import RoutedRequest
    from loom.router.strategies import StrategyRouter

    placement = LocalPlacement(str(tiny_dir), quiet=True, max_restarts=3)

    async def scenario() -> None:
        router = StrategyRouter(placement.start(1), make_dp())
        manager = EngineManager(router, placement, max_engines=2, scale_queue=1.0,
                                idle_needed=2)  # fmt: skip
        sampling = {"max_tokens": 400, "temperature": 0.0, "ignore_eos": True}

        async def one(i: int) -> None:
            async for _ in router.handle(RoutedRequest(list(range(5, 40)), f"s{i}", sampling)):
                pass

        jobs = [asyncio.create_task(one(i)) for i in range(3)]
        while router.engines[0].running < 2:
            await asyncio.sleep(0.01)
        await manager.autoscale()  # 2+ in flight on 1 engine, above 1.0 each: one more
        assert len(router.engines) == 2 and manager.scaled["up"] == 1
        await asyncio.gather(*jobs)
        new = router.engines[1]
        proc = placement.procs[new.url].proc
        await manager.autoscale()  # idle once: not yet
        assert len(router.engines) == 2
        await manager.autoscale()  # idle twice: the added engine goes (never the first)
        assert [e.index for e in router.engines] == [0] and manager.scaled["down"] == 1
        assert proc.poll() is not None
        # An engine that dies is started again on its cores, and the router follows it.
        first = router.engines[0]
        dead_url, cores = first.url, placement.procs[first.url].cpus
        placement.procs[dead_url].proc.kill()
        placement.procs[dead_url].proc.wait()
        await router.probe()
        assert not first.alive
        await manager.follow()
        assert first.url != dead_url and first.alive
        assert placement.procs[first.url].cpus == cores and placement.restarts_left == 2
        async for _ in router.handle(RoutedRequest([5, 6, 7], "after", sampling)):
            pass
        await router.close()

    try:
        asyncio.run(scenario())
    finally:
        placement.close()


def test_scale_decision() -> None:
    from loom.router.manage import scale_decision

    assert scale_decision([5, 4], 2, 4, 4.0, 0, 3) == 1  # 4.5 per engine > 4
    assert scale_decision([4, 4], 2, 4, 4.0, 0, 3) == 0
    assert scale_decision([9, 9, 9, 9], 2, 4, 4.0, 0, 3) == 0  # at the maximum
    assert scale_decision([0, 0, 0], 2, 4, 4.0, 3, 3) == -1
    assert scale_decision([0, 0, 0], 2, 4, 4.0, 2, 3) == 0  # not idle long enough
    assert scale_decision([0, 0], 2, 4, 4.0, 9, 3) == 0  # at the minimum


def test_kv_transport_auto_is_shm_on_this_host_and_tcp_across() -> None:
    from loom.engine.kv_transfer.transports import for_destination, on_this_host

    assert on_this_host("127.0.0.1") and on_this_host("localhost")
    assert not on_this_host("198.51.100.7")  # TEST-NET-2: no machine's own address
    assert not on_this_host("no-such-host.invalid")
    assert for_destination("auto", "127.0.0.1:7000").name == "shm"
    assert for_destination("auto", "198.51.100.7:7000").name == "tcp"
    assert for_destination("tcp", "127.0.0.1:7000").name == "tcp"
    with pytest.raises(ValueError, match="KV transport"):
        for_destination("carrier-pigeon", "127.0.0.1:7000")


def test_router_settings_from_flags_and_toml(tmp_path: Path) -> None:
    from loom.cli import build_parser
    from loom.config import RouterConfig
    from loom.config.fields import build, merged, names

    def config(*argv: str) -> RouterConfig:
        args = build_parser().parse_args(["router", *argv])
        given = {n: getattr(args, n) for n in names(RouterConfig)}
        return build(RouterConfig, merged(args.config, given, names(RouterConfig)))

    assert config().ray is None and config().kv_transport == "auto"
    assert config("--ray").ray == "local"
    assert config("--ray", "10.0.0.5:6379", "--engines", "4").ray == "10.0.0.5:6379"
    toml = tmp_path / "router.toml"
    toml.write_text('ray = "10.0.0.9:6379"\nplacement = "spread"\nengine_cpus = 4.0\n'
                    'max_engines = 8\n')  # fmt: skip
    c = config("--config", str(toml), "--engine-cpus", "2")
    assert (c.ray, c.placement, c.engine_cpus, c.max_engines) == ("10.0.0.9:6379", "spread",
                                                                   2.0, 8)  # fmt: skip
    c = config("--dtype", "bfloat16", "--num-pages", "512")
    assert (c.dtype, c.num_pages) == ("bfloat16", 512)
    with pytest.raises(ValueError, match="engine_cpus"):
        config("--engine-cpus", "0")


def test_router_refuses_a_model_it_cannot_read_before_starting_engines(tmp_path: Path) -> None:
    import subprocess
    import sys

    missing = tmp_path / "no-model"
    for extra in ([], ["--ray"]):  # the check comes before any engine or Ray cluster
        r = subprocess.run([sys.executable, "-m", "loom", "router", "--model", str(missing),
                            "--engines", "1", *extra], capture_output=True, text=True,
                           timeout=60)  # fmt: skip
        assert r.returncode == 2, r.stderr
        assert "does not exist" in r.stderr and "Traceback" not in r.stderr
