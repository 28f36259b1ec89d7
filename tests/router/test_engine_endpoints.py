"""The three microserving calls on in-process engines: window rules, KV equality with a
local recomputation, expiry, failed transfers, aborts."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from loom.config import ServeConfig
from loom.server.app import BackgroundServer
from tests.helpers import kv_bytes_per_token


@pytest.fixture(scope="module")
def pair(tiny_dir: Path) -> Iterator[tuple[Any, Any]]:
    def make() -> BackgroundServer:
        return BackgroundServer(
            ServeConfig.of(
                model=str(tiny_dir), port=0, worker="thread", num_pages=128, reservation_ttl_s=1.0
            )
        )

    with make() as p, make() as d:
        introduce(p, d)
        yield p, d


def post(srv: Any, path: str, **body: Any) -> httpx.Response:
    return httpx.post(srv.url + "/microserving/" + path, json=body, timeout=60)


def introduce(sender: Any, receiver: Any) -> None:
    """Register ``receiver``'s KV receiver as a peer of ``sender`` (what a router does)."""
    addr = httpx.get(receiver.url + "/microserving/peers").json()["recv_engine"]
    r = post(sender, "peers", peers=[addr])
    assert r.status_code == 200 and addr in r.json()["peers"], r.text


def cache_of(srv: Any) -> Any:
    return srv.state.runtime.worker._runner.engine.runner.cache


def held(srv: Any) -> int:
    rt = srv.state.runtime
    return int(rt.query(lambda: rt.pool.num_used - len(rt.prefix_cache)))


PROMPT = [(i * 37) % 1900 + 50 for i in range(45)]


def send_to(
    p: Any,
    prep: dict[str, Any],
    rid: str,
    *,
    prompt: list[int] = PROMPT,
    recv_engine: str | None = None,
) -> httpx.Response:
    """``remote_send`` from ``p`` of ``prompt[matched:-1]`` into ``prep``'s reservation."""
    return post(
        p,
        "remote_send",
        prompt=prompt,
        end=-1,
        request_id=rid,
        begin=prep["prefix_matched_length"],
        kv_addr_info=prep["kv_addr_info"],
        recv_engine=recv_engine or prep["recv_engine"],
    )


def test_received_kv_equals_local_recomputation(pair: tuple[Any, Any], tiny_dir: Path) -> None:
    p, d = pair
    prep = post(d, "prep_recv", prompt=PROMPT, end=-1, request_id="eq-1").json()
    slots = _slots(prep["kv_addr_info"])
    assert prep["prefix_matched_length"] == 0 and len(slots) == 44
    sent = post(
        p,
        "remote_send",
        prompt=PROMPT,
        begin=0,
        end=-1,
        request_id="eq-1",
        kv_addr_info=prep["kv_addr_info"],
        recv_engine=prep["recv_engine"],
    )
    assert sent.status_code == 200, sent.text
    # What a local prefill of the same 44 tokens writes, on a third engine.
    from loom import LLM, SamplingParams

    llm = LLM(str(tiny_dir), num_pages=16, enable_prefix_caching=False)
    llm.generate([PROMPT[:44]], SamplingParams(max_tokens=1))
    local = llm.engine.runner.cache
    local_slots = torch.arange(44)  # a fresh engine allocates pages from 0
    got = cache_of(d).kv[:, :, torch.tensor(slots)]
    want = local.kv[:, :, local_slots]
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    cache = cache_of(d)
    assert cache.slot_pos[torch.tensor(slots)].tolist() == list(range(44))
    assert bool(cache.slot_live[torch.tensor(slots)].all())
    gen = post(
        d,
        "start_generate",
        prompt=PROMPT,
        begin=-1,
        request_id="eq-1",
        max_tokens=6,
        temperature=0,
        ignore_eos=True,
    )
    want_text = llm.generate(
        [PROMPT], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    )[0].text
    assert gen.json()["choices"][0]["text"] == want_text
    assert held(p) == 0 and held(d) == 0


def _slots(info: str) -> list[int]:
    from loom.runtime.microserving_wire import decode_addr

    return decode_addr(info)


@pytest.mark.parametrize(
    ("path", "body", "status", "words"),
    [
        ("prep_recv", {"end": 45}, 400, "less than the prompt length"),
        ("prep_recv", {"end": -46}, 400, "outside the prompt"),
        ("prep_recv", {"end": 3, "prompt": []}, 400, "empty"),
        ("remote_send", {"begin": 10, "end": 10}, 400, "begin (10) must be less than end (10)"),
        ("remote_send", {"begin": 0, "end": 45}, 400, "less than the prompt length"),
        (
            "remote_send",
            {"begin": 0, "end": 5, "kv_addr_info": "!!"},
            400,
            "not a valid KV address",
        ),
        ("remote_send", {"begin": 0, "end": 5}, 400, "slots; the window [0:5] has 5 tokens"),
        ("start_generate", {"begin": 3, "request_id": "never-made"}, 404, "no reservation"),
        ("start_generate", {"begin": 45}, 400, "outside the prompt"),
        ("start_generate", {"begin": 0, "n": 2}, 400, "n=1"),
    ],
)
def test_window_rules_and_unknown_ids_get_clear_errors(
    pair: tuple[Any, Any], path: str, body: dict[str, Any], status: int, words: str
) -> None:
    p, d = pair
    addr = post(d, "prep_recv", prompt=PROMPT, end=-1, request_id=f"rules-{path}-{status}")
    base = {
        "prompt": PROMPT,
        "request_id": "rules-x",
        "kv_addr_info": addr.json()["kv_addr_info"],
        "recv_engine": addr.json()["recv_engine"],
    }
    if path == "prep_recv":
        base = {"prompt": PROMPT, "request_id": "rules-y"}
    if path == "start_generate":
        base = {"prompt": PROMPT, "request_id": "rules-z"}
    r = post(p if path == "remote_send" else d, path, **{**base, **body})
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]
    post(d, "abort", request_id=f"rules-{path}-{status}")


def test_a_duplicate_request_id_is_refused(pair: tuple[Any, Any]) -> None:
    _, d = pair
    assert post(d, "prep_recv", prompt=PROMPT, end=-1, request_id="dup").status_code == 200
    r = post(d, "prep_recv", prompt=PROMPT, end=-1, request_id="dup")
    assert r.status_code == 409 and "already in use" in r.json()["error"]["message"]
    assert post(d, "abort", request_id="dup").json() == {"aborted": True}
    assert post(d, "abort", request_id="dup").json() == {"aborted": False}


def test_an_unused_reservation_expires_and_frees_its_pages(pair: tuple[Any, Any]) -> None:
    p, d = pair
    before = held(d)
    prep = post(d, "prep_recv", prompt=PROMPT, end=-1, request_id="exp-1").json()
    assert held(d) > before
    time.sleep(1.6)  # the fixture's reservations live 1 s
    assert held(d) == before
    # A transfer into the expired reservation is refused, and nothing is decoded.
    r = send_to(p, prep, "exp-1")
    assert r.status_code == 502 and "no reservation" in r.json()["error"]["message"]
    g = post(d, "start_generate", prompt=PROMPT, begin=-1, request_id="exp-1")
    assert g.status_code == 404
    assert held(p) == 0 and held(d) == before


def test_a_failed_transfer_is_never_decoded(pair: tuple[Any, Any]) -> None:
    p, d = pair
    prep = post(d, "prep_recv", prompt=PROMPT, end=-1, request_id="fail-1").json()
    # The prefill engine cannot reach the receiver (a peer that died): the send fails ...
    assert post(p, "peers", peers=["127.0.0.1:9"]).status_code == 200
    r = send_to(p, prep, "fail-1", recv_engine="127.0.0.1:9")
    assert r.status_code == 502 and "KV transfer failed" in r.json()["error"]["message"]
    # ... and the decode engine refuses to generate from the missing KV.
    g = post(d, "start_generate", prompt=PROMPT, begin=-1, request_id="fail-1", max_tokens=4)
    assert g.status_code == 409 and "never fully arrived" in g.json()["error"]["message"]
    assert held(p) == 0 and held(d) == 0


def test_a_client_that_disconnects_aborts_the_decode_side(pair: tuple[Any, Any]) -> None:
    p, d = pair
    prep = post(d, "prep_recv", prompt=PROMPT, end=-1, request_id="dis-1").json()
    send_to(p, prep, "dis-1")
    body = {
        "prompt": PROMPT,
        "begin": -1,
        "request_id": "dis-1",
        "max_tokens": 1500,
        "ignore_eos": True,
        "stream": True,
        "temperature": 0,
    }
    with httpx.stream("POST", d.url + "/microserving/start_generate", json=body) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: "):
                break
    deadline = time.monotonic() + 20
    while held(d) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert held(d) == 0 and held(p) == 0


@pytest.mark.parametrize("transport", ["shm", "gloo"])
def test_other_transports_give_the_same_kv(
    pair: tuple[Any, Any], tiny_dir: Path, transport: str
) -> None:
    import os

    from loom import LLM, SamplingParams

    _, d = pair
    prompt = [len(transport), *((i * 53) % 1900 + 60 for i in range(36))]
    segments = set(os.listdir("/dev/shm"))
    # The receiver named in the configuration (--kv-peers) rather than registered; the
    # sender's own receiver on the port given (--kv-port).
    d_recv = httpx.get(d.url + "/microserving/peers").json()["recv_engine"]
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        kv_port = free.getsockname()[1]
    settings = ServeConfig.of(
        model=str(tiny_dir), port=0, worker="thread", num_pages=64, kv_transport=transport,
        kv_peers=(d_recv,), kv_port=kv_port,
    )  # fmt: skip
    with BackgroundServer(settings) as p:
        own = httpx.get(p.url + "/microserving/peers").json()
        assert own == {"recv_engine": f"127.0.0.1:{kv_port}", "peers": []}
        prep = post(d, "prep_recv", prompt=prompt, end=-1, request_id=f"{transport}-1").json()
        sent = send_to(p, prep, f"{transport}-1", prompt=prompt)
        assert sent.status_code == 200, sent.text
        assert sent.json()["bytes"] == 36 * kv_bytes_per_token(tiny_dir)
        llm = LLM(str(tiny_dir), num_pages=16, enable_prefix_caching=False)
        llm.generate([prompt[:36]], SamplingParams(max_tokens=1))
        got = cache_of(d).kv[:, :, torch.tensor(_slots(prep["kv_addr_info"]))]
        assert torch.allclose(got, llm.engine.runner.cache.kv[:, :, :36], atol=1e-5)
        gen = post(
            d,
            "start_generate",
            prompt=prompt,
            begin=-1,
            request_id=f"{transport}-1",
            max_tokens=5,
            temperature=0,
            ignore_eos=True,
        )
        greedy = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
        assert gen.json()["choices"][0]["text"] == llm.generate([prompt], greedy)[0].text
        assert held(p) == 0
    assert held(d) == 0
    assert set(os.listdir("/dev/shm")) == segments  # every frame's segment was removed


def test_an_engine_without_prefix_cache_matches_nothing(
    pair: tuple[Any, Any], tiny_dir: Path
) -> None:
    _, d = pair
    prompt = [7, *((i * 41) % 1900 + 70 for i in range(40))]
    settings = ServeConfig.of(
        model=str(tiny_dir), port=0, worker="thread", num_pages=64, prefix_cache=False
    )
    with BackgroundServer(settings) as off:
        for srv in (d, off):
            done = httpx.post(
                srv.url + "/v1/completions",
                json={"model": tiny_dir.name, "prompt": prompt, "max_tokens": 2},
                timeout=60,
            )
            assert done.status_code == 200, done.text
        # The same prompt again: the caching engine holds its two full pages, the other
        # engine kept nothing, so its receiver must take the whole window.
        on_prep = post(d, "prep_recv", prompt=prompt, end=-1, request_id="pc-on").json()
        off_prep = post(off, "prep_recv", prompt=prompt, end=-1, request_id="pc-off").json()
        assert on_prep["prefix_matched_length"] == 32
        assert off_prep["prefix_matched_length"] == 0
        assert len(_slots(off_prep["kv_addr_info"])) == 40
        post(d, "abort", request_id="pc-on")
        post(off, "abort", request_id="pc-off")
        assert held(off) == 0
