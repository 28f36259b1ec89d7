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


def register(linker: ComponentLinker, rt: RuntimeServices) -> None:
    add_future_resource(linker, rt, NAME, "response-future", result(RESPONSE, STRING))

    def fetch(key: int, method: str, url: str, headers: list[tuple[str, str]], body: bytes) -> int:
        inst = rt.caller(key)
        fut = HostFuture()
        why = allowed(url, rt.config.http_allow_hosts)
        if why is not None:
            fut.resolve(Err(why))
        else:
            req = urllib.request.Request(
                url, data=body or None, headers=dict(headers), method=method.upper()
            )

            def run() -> None:
                value: Any
                try:
                    with urllib.request.urlopen(req, timeout=rt.config.http_timeout_s) as resp:
                        data = resp.read(rt.config.max_message_bytes + 1)
                        if len(data) > rt.config.max_message_bytes:
                            value = Err("response body exceeds the message-size cap")
                        else:
                            value = Ok((resp.status, list(resp.headers.items()), data))
                except urllib.error.HTTPError as e:
                    value = Ok((e.code, list(e.headers.items()), e.read()))
                except Exception as e:
                    value = Err(f"request failed: {e}")
                rt.call_soon(lambda: fut.resolve(value))

            threading.Thread(target=run, name="loom-http", daemon=True).start()
        return rt.handles.add(inst.seq, fut)

    linker.add_func(
        NAME, "fetch", [STRING, STRING, HEADERS, list_of(U8)], own("response-future"), fetch
    )
