"""``http``: outgoing requests, only to hosts the server's policy allows.

The request runs on a short-lived thread (never on the runtime thread); its result is
handed back to the runtime thread, which resolves the guest's future.
"""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from loom.runtime.futures import HostFuture
from loom.runtime.host.common import add_future_resource, iface
from loom.runtime.wasm.ffi import (
    STRING,
    U8,
    U16,
    ComponentLinker,
    Err,
    Ok,
    list_of,
    own,
    record,
    result,
    tuple_of,
)

if TYPE_CHECKING:
    from loom.runtime.services import RuntimeServices

NAME = iface("http")
HEADERS = list_of(tuple_of(STRING, STRING))
RESPONSE = record(("status", U16), ("headers", HEADERS), ("body", list_of(U8)))


def allowed(url: str, allow: tuple[str, ...]) -> str | None:
    """None when the policy allows ``url``, else the reason it does not."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"not an http(s) URL: {url!r}"
    if "*" in allow or parts.hostname in allow:
        return None
    return f"host {parts.hostname!r} is not allowed by the server's HTTP policy"


class _PolicyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to a URL the policy allows (every hop is checked)."""

    def __init__(self, allow: tuple[str, ...]) -> None:
        self.allow = allow

    def redirect_request(
        self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> Any:
        why = allowed(newurl, self.allow)
        if why is not None:
            raise urllib.error.URLError(f"redirect refused: {why}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _capped(read: Any, cap: int) -> bytes:
    data: bytes = read(cap + 1)
    if len(data) > cap:
        raise ValueError("response body exceeds the message-size cap")
    return data


def register(linker: ComponentLinker, rt: RuntimeServices) -> None:
    add_future_resource(linker, rt, NAME, "response-future", result(RESPONSE, STRING))
    inflight: dict[int, int] = {}  # instance seq -> requests not answered yet

    def fetch(key: int, method: str, url: str, headers: list[tuple[str, str]], body: bytes) -> int:
        inst = rt.caller(key)
        fut = HostFuture()
        config = rt.config
        why = allowed(url, config.http_allow_hosts)
        if why is None and inflight.get(inst.seq, 0) >= config.max_http_requests:
            why = f"more than {config.max_http_requests} HTTP requests in flight"
        if why is not None:
            fut.resolve(Err(why))
            return rt.handles.add(inst.seq, fut)
        req = urllib.request.Request(
            url, data=body or None, headers=dict(headers), method=method.upper()
        )
        opener = urllib.request.build_opener(_PolicyRedirects(config.http_allow_hosts))
        cap, timeout, seq = config.max_message_bytes, config.http_timeout_s, inst.seq
        inflight[seq] = inflight.get(seq, 0) + 1

        def answer(value: Any) -> None:  # runtime thread
            left = inflight.pop(seq, 1) - 1
            if left:
                inflight[seq] = left
            fut.resolve(value)

        def run() -> None:
            value: Any
            try:
                with opener.open(req, timeout=timeout) as resp:
                    value = Ok((resp.status, list(resp.headers.items()), _capped(resp.read, cap)))
            except urllib.error.HTTPError as e:  # an answer all the same, under the same cap
                try:
                    value = Ok((e.code, list(e.headers.items()), _capped(e.read, cap)))
                except ValueError as too_big:
                    value = Err(str(too_big))
                finally:
                    e.close()
            except Exception as e:
                value = Err(f"request failed: {e}")
            rt.call_soon(lambda: answer(value))

        threading.Thread(target=run, name="loom-http", daemon=True).start()
        return rt.handles.add(inst.seq, fut)

    linker.add_func(
        NAME, "fetch", [STRING, STRING, HEADERS, list_of(U8)], own("response-future"), fetch
    )
