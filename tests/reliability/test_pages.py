"""An inferlet that holds the KV pool cannot hang completions: a host generation that
waits for pages ends, under the page-wait timeout, with an error saying so; and one that
gets its pages in time completes."""

from __future__ import annotations

from typing import Any

from tests.reliability.support import complete


def test_a_completion_waiting_for_pages_times_out_with_a_clear_error(
    rrt: Any, testkit: str
) -> None:
    free = rrt.query(lambda: rrt.pool.num_available())
    saved = rrt.reconfigure(page_wait_timeout_s=1.0)
    hoarder = rrt.launch(testkit, ["hold", str(free - 1)])  # one page left
    try:
        assert hoarder.recv(30) == "holding"
        done, box = complete(rrt, 64)  # needs 5 pages of 16
        assert done.wait(30), "the completion waited for pages with no end"
        (result,) = box
        assert result.finish_reason == "error"
        assert "out of KV pages" in (result.error or "")
    finally:
        rrt.reconfigure(saved)
        hoarder.send("release")
    assert hoarder.wait(30).ok
    done, box = complete(rrt, 64)  # with the pages back, the same request completes
    assert done.wait(60) and box[0].error is None and len(box[0].tokens) == 64
