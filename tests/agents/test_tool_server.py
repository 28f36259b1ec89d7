"""The tool server's tools over real HTTP: answers, errors, latency and limits."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import pytest

from loom.testing.tool_server import ToolServer, calculate, run_code


def get(url: str, body: bytes | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_calculate_allows_arithmetic_only() -> None:
    assert calculate("2 * (10 + 3) - 2 ** 3") == 18
    for bad in ("__import__('os')", "x + 1", "2 ** 1000", "1 / 0", "True + 1", "1 +"):
        with pytest.raises(ValueError):
            calculate(bad)


def test_run_code_is_limited_in_time_and_memory() -> None:
    assert run_code("print(sum(range(10)))", 5, 512 << 20) == (0, "45\n")
    status, out = run_code("import time\ntime.sleep(5)", 0.5, 512 << 20)
    assert status == -9 and "time limit" in out
    status, out = run_code("x = bytearray(2 ** 31)", 5, 256 << 20)
    assert status != 0 and "MemoryError" in out


def test_tools_over_http_with_latency_and_counts() -> None:
    with ToolServer(latency_ms=100) as s:
        t0 = time.perf_counter()
        status, text = get(s.url + "/search?q=river+robot&k=3")
        assert time.perf_counter() - t0 >= 0.1
        assert status == 200 and len(text.splitlines()) == 3
        assert get(s.url + "/calc?expr=6*7&delay_ms=0") == (200, "42")
        assert get(s.url + "/calc?expr=os&delay_ms=0")[0] == 400
        assert get(s.url + "/fact?key=capital-of-france&delay_ms=0") == (200, "Paris")
        assert get(s.url + "/fact?key=k&delay_ms=0", b"v") == (200, "stored")
        assert get(s.url + "/fact?key=k&delay_ms=0") == (200, "v")
        assert get(s.url + "/fact?key=missing&delay_ms=0")[0] == 404
        assert get(s.url + "/fail?delay_ms=0")[0] == 500
        assert get(s.url + "/run?delay_ms=0", b"print('hi')") == (200, "hi\n")
        assert get(s.url + "/nope?delay_ms=0")[0] == 404
        assert s.calls["search"] == 1 and s.calls["fact"] == 4 and s.calls["calc"] == 2
