"""Hostile callers of the microserving endpoints and the KV channel.

``remote_send`` connects only to KV receivers the engine knows (a router registers them),
and fails fast on one that is silent or stalls; a receiver with a secret takes frames only
from senders proving they hold it; ``prep_recv`` reservations are held to a share of the
pool per client (before: anyone could make the engine probe any port, write KV into
reservations, and 65 anonymous calls pinned 8,125 of 8,188 pages for 60 s)."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

PROMPT = [(i * 37) % 1900 + 50 for i in range(45)]
KEYS = ("key-a", "key-b")  # the keyed engine's KV secret is the first


@pytest.fixture(scope="module")
def keyed(tiny_dir: Path) -> Iterator[Any]:
    """An engine with API keys (so a KV secret) and a 1 s KV progress timeout."""
    from loom.config import ServeConfig
    from loom.server.app import BackgroundServer

    config = ServeConfig.of(model=str(tiny_dir), port=0, worker="thread", num_pages=128,
                            api_keys=KEYS, kv_progress_timeout_s=1.0)  # fmt: skip
    with BackgroundServer(config) as srv:
        yield srv


def post(srv: Any, path: str, key: str | None = None, timeout: float = 60, **body: Any) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(srv.url + "/microserving/" + path, json=body, headers=headers,
                      timeout=timeout)  # fmt: skip


def held(srv: Any) -> int:
    rt = srv.state.runtime
    return int(rt.query(lambda: rt.pool.num_used - len(rt.prefix_cache)))


def send(srv: Any, prep: dict[str, Any], rid: str, dst: str, **kw: Any) -> Any:
    return post(srv, "remote_send", prompt=PROMPT, end=-1, request_id=rid, recv_engine=dst,
                begin=prep["prefix_matched_length"], kv_addr_info=prep["kv_addr_info"],
                **kw)  # fmt: skip


def test_remote_send_refuses_an_address_that_is_not_a_known_peer(server: Any) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.5)
    try:
        prep = post(server, "prep_recv", prompt=PROMPT, end=-1, request_id="probe-1").json()
        host, port = listener.getsockname()[:2]
        r = send(server, prep, "probe-1", f"{host}:{port}")
        assert r.status_code == 403 and r.json()["error"]["code"] == "unknown_peer", r.text
        with pytest.raises(TimeoutError):
            listener.accept()  # the engine never connected: nothing to learn about the port
    finally:
        listener.close()
        post(server, "abort", request_id="probe-1")


def test_remote_send_to_a_silent_peer_fails_fast(server: Any) -> None:
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never says a word
    try:
        host, port = silent.getsockname()[:2]
        assert post(server, "peers", peers=[f"{host}:{port}"]).status_code == 200
        prep = post(server, "prep_recv", prompt=PROMPT, end=-1, request_id="silent-1").json()
        t0 = time.monotonic()
        sent = send(server, prep, "silent-1", f"{host}:{port}")
        took = time.monotonic() - t0
        assert sent.status_code >= 400 and "not a Loom KV receiver" in sent.text, sent.text
        assert took < 15, took  # the greeting timeout (2 s), not the transfer's (60 s)
        # The engine serves completions meanwhile and after.
        r = httpx.post(server.url + "/v1/completions", timeout=60, json={
            "model": server.state.model_name, "prompt": "Hello", "max_tokens": 4})  # fmt: skip
        assert r.status_code == 200
    finally:
        silent.close()
        post(server, "abort", request_id="silent-1")


def raw_transfer(
    srv: Any, prep: dict[str, Any], rid: str, auth: str | None = None, secret: str | None = None
) -> Any:
    """Write zeros into ``prep``'s reservation as a bare client would, answering the
    greeting with ``auth`` (or the HMAC of its nonce under ``secret``): the receiver's
    verdict, or None when it hung up."""
    from loom.engine.kv_transfer.wire import recv_frame, rle, send_frame
    from loom.runtime.microserving_wire import decode_addr

    layers, _, _, heads, dim = srv.state.runtime.worker._runner.engine.kv.shape
    slots = decode_addr(prep["kv_addr_info"])
    host, _, port = prep["recv_engine"].rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        greeting, _ = recv_frame(sock, 0)
        try:
            if secret is not None:
                auth = mac(secret, greeting["nonce"])
            if auth is not None:
                send_frame(sock, {"auth": auth})
                answer, _ = recv_frame(sock, 0)
                if answer.get("auth") != "ok":
                    return answer
            for layer in range(layers):
                send_frame(sock, {"rid": rid, "layer": layer, "slots": rle(slots),
                                  "dtype": "torch.float32", "shape": [2, len(slots), heads, dim]},
                           bytes(8 * len(slots) * heads * dim))  # fmt: skip
            send_frame(sock, {"rid": rid, "end": True})
            return recv_frame(sock, 0)[0]
        except (ConnectionError, OSError, ValueError):
            return None


def mac(secret: str, nonce: str) -> str:
    return hmac.new(secret.encode(), b"loom-kv1:" + nonce.encode(), hashlib.sha256).hexdigest()


def test_kv_frames_need_the_secret(keyed: Any) -> None:
    a = KEYS[0]
    # Registering peers is behind the API key like every other route.
    assert post(keyed, "peers", peers=["127.0.0.1:9"]).status_code == 401
    prep = post(keyed, "prep_recv", key=a, prompt=PROMPT, end=-1, request_id="raw-1").json()
    assert raw_transfer(keyed, prep, "raw-1") is None  # frames without the secret: hung up
    wrong = raw_transfer(keyed, prep, "raw-1", auth="0" * 64)
    assert wrong == {"error": "wrong KV secret"}
    gen = post(keyed, "start_generate", key=a, prompt=PROMPT, begin=-1, request_id="raw-1")
    assert gen.status_code == 409 and "never fully arrived" in gen.text, gen.text
    # The same bytes from a holder of the secret are taken (the protocol is the real one).
    from loom.engine.kv_transfer.wire import recv_frame

    prep = post(keyed, "prep_recv", key=a, prompt=PROMPT, end=-1, request_id="raw-2").json()
    host, _, port = prep["recv_engine"].rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5) as probe:
        nonce = recv_frame(probe, 0)[0]["nonce"]
    assert len(nonce) == 32  # a fresh nonce per connection: an answer cannot be replayed
    verdict = raw_transfer(keyed, prep, "raw-2", secret=a)
    assert verdict is not None and verdict["ok"], verdict
    post(keyed, "abort", key=a, request_id="raw-2")
    assert held(keyed) == 0


def test_an_engine_without_the_secret_cannot_send_kv(server: Any, keyed: Any) -> None:
    a = KEYS[0]
    prep = post(keyed, "prep_recv", key=a, prompt=PROMPT, end=-1, request_id="nosecret-1").json()
    assert post(server, "peers", peers=[prep["recv_engine"]]).status_code == 200
    sent = send(server, prep, "nosecret-1", prep["recv_engine"])
    assert sent.status_code == 502 and "wants a KV secret" in sent.text, sent.text
    gen = post(keyed, "start_generate", key=a, prompt=PROMPT, begin=-1, request_id="nosecret-1")
    assert gen.status_code == 409
    assert held(server) == 0 and held(keyed) == 0


def test_a_stalled_transfer_fails_on_the_progress_timeout(keyed: Any) -> None:
    """A receiver that greets and then reads nothing fails the send after the progress
    timeout (1 s here), not the whole transfer's 60 s; a sender that stops in the middle
    of a frame is hung up on after the same time."""
    from loom.engine.kv_transfer.wire import GREETING, recv_frame, send_frame
    from loom.runtime.microserving_wire import encode_addr

    stalled = socket.create_server(("127.0.0.1", 0))
    held_open: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            conn, _ = stalled.accept()
            send_frame(conn, GREETING)
            held_open.append(conn)  # never read from, never answered

    threading.Thread(target=accept, daemon=True).start()
    host, port = stalled.getsockname()[:2]
    a = KEYS[0]
    try:
        assert post(keyed, "peers", key=a, peers=[f"{host}:{port}"]).status_code == 200
        prep = {"prefix_matched_length": 0, "kv_addr_info": encode_addr(list(range(44)))}
        t0 = time.monotonic()
        sent = send(keyed, prep, "stall-1", f"{host}:{port}", key=a, timeout=20)
        assert sent.status_code == 502 and "no progress for 1 s" in sent.text, sent.text
        assert time.monotonic() - t0 < 8
    finally:
        stalled.close()
        for conn in held_open:
            conn.close()
    # The other way round: half a frame, then silence.
    prep = post(keyed, "prep_recv", key=a, prompt=PROMPT, end=-1, request_id="stall-2").json()
    rhost, _, rport = prep["recv_engine"].rpartition(":")
    with socket.create_connection((rhost, int(rport)), timeout=10) as sock:
        nonce = recv_frame(sock, 0)[0]["nonce"]
        send_frame(sock, {"auth": mac(a, nonce)})
        assert recv_frame(sock, 0)[0] == {"auth": "ok"}
        sock.sendall(b"LKV1")  # the start of a frame's prefix, and nothing more
        t0 = time.monotonic()
        assert sock.recv(1) == b""  # the receiver hangs up ...
        assert time.monotonic() - t0 < 8  # ... after the progress timeout
    post(keyed, "abort", key=a, request_id="stall-2")


def long_prompt(seed: int) -> list[int]:
    return [seed, *((i * 53 + seed * 7) % 1900 + 60 for i in range(299))]  # 19 pages


def test_reservations_are_held_to_a_share_of_the_pool_per_client(server: Any, keyed: Any) -> None:
    # Anonymous callers are one client per address: 3 reservations of 19 pages fit in
    # half of the 128-page pool, the 4th is refused.
    made = []
    for k in range(4):
        r = post(server, "prep_recv", prompt=long_prompt(k), end=-1, request_id=f"anon-{k}")
        if k < 3:
            assert r.status_code == 200, r.text
            made.append(f"anon-{k}")
        else:
            assert r.status_code == 429, r.text
            assert r.json()["error"]["code"] == "reservation_quota"
            assert "--max-reserved-share" in r.json()["error"]["message"]
    assert held(server) <= 64
    for rid in made:
        post(server, "abort", request_id=rid)
    # Once they end, the client may reserve again.
    r = post(server, "prep_recv", prompt=long_prompt(9), end=-1, request_id="anon-9")
    assert r.status_code == 200
    post(server, "abort", request_id="anon-9")
    assert held(server) == 0
    # With keys, each key is a client: one key's full quota leaves the other's whole.
    a, b = KEYS
    for k in range(3):
        r = post(keyed, "prep_recv", key=a, prompt=long_prompt(20 + k), end=-1,
                 request_id=f"a-{k}")  # fmt: skip
        assert r.status_code == 200, r.text
    over = post(keyed, "prep_recv", key=a, prompt=long_prompt(30), end=-1, request_id="a-3")
    assert over.status_code == 429
    other = post(keyed, "prep_recv", key=b, prompt=long_prompt(31), end=-1, request_id="b-0")
    assert other.status_code == 200, other.text
    for rid in ("a-0", "a-1", "a-2"):
        post(keyed, "abort", key=a, request_id=rid)
    post(keyed, "abort", key=b, request_id="b-0")
    assert held(keyed) == 0
