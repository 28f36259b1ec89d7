"""The inferlet runtime end to end: real componentize-py guests on wasmtime fibers."""

from __future__ import annotations

import http.server
import json
import threading
import time
from typing import Any

import pytest

from loom import LLM, SamplingParams
from tests.runtime_helpers import free_pages
from tests.runtime_helpers import run_inferlet as run

CTX = [10 + i for i in range(32)]  # two full pages of context


def test_hello_reports_its_instance_id(rt: Any, testkit: str) -> None:
    result, messages = run(rt, testkit, "hello")
    assert result.ok, result.error
    assert messages == [f"hello from {result.instance_id}"]


def test_client_messages_reach_the_guest(rt: Any, testkit: str) -> None:
    h = rt.launch(testkit, ["echo"])
    h.send("ping")
    assert h.recv(timeout=30) == "echo:ping"
    assert h.wait(30).ok


def test_guest_decode_matches_the_engine(rt: Any, testkit: str, tiny_dir: Any) -> None:
    prompt = [5, 6, 7, 8, 9]
    result, messages = run(rt, testkit, "decode", ",".join(map(str, prompt)), "6")
    assert result.ok, result.error
    llm = LLM(str(tiny_dir), num_pages=32)
    ref = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    assert json.loads(messages[0]) == ref[0].token_ids


def test_fused_steps_decode_like_a_built_pass(rt: Any, testkit: str) -> None:
    prompt = "5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21"  # crosses a page boundary
    modes = ("decode", "step-decode", "wait-decode")
    (built, want), *fused = (run(rt, testkit, mode, prompt, "8") for mode in modes)
    assert built.ok, built.error
    for result, messages in fused:
        assert result.ok, result.error
        assert json.loads(messages[0]) == json.loads(want[0])


def _slow_engine(rt: Any, seconds: float) -> Any:
    """Make the in-process worker's engine take ``seconds`` more per step (a larger
    model's step, longer than a guest's turn); ``del engine.execute`` restores it."""
    engine = rt.worker._runner.engine
    execute = engine.execute

    def slow_execute(batch: Any) -> Any:
        time.sleep(seconds)
        return execute(batch)

    engine.execute = slow_execute
    return engine


def _decode_together(
    rt: Any, testkit: str, mode: str, prompts: list[str], steps: int
) -> tuple[list[Any], list[int]]:
    """Guests decoding together on an engine with a 30 ms step (longer than their
    turns): their handles, and the sizes of the batches they rode."""
    engine = _slow_engine(rt, 0.03)
    try:
        before = rt.query(lambda: len(rt.stats.batch_sizes))
        handles = [rt.launch(testkit, [mode, p, str(steps)]) for p in prompts]
        assert all(h.wait(60).ok for h in handles)
        sizes = rt.query(lambda: list(rt.stats.batch_sizes)[before:])
    finally:
        del engine.execute
    return handles, sizes


def test_chained_steps_decode_like_waited_steps(rt: Any, testkit: str) -> None:
    # step-chain queues each step's pass before the guest sees the token it needs; the
    # tokens must be those of one waited pass per step, and the pass ahead left at the
    # end, settled once it ran, has sampled the next one. With a step longer than the
    # guest's turn, every pass ahead is sent to the engine while the pass it follows
    # still runs (the worker fills in its token): a "chained" batch per step.
    prompt = "5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21"  # crosses a page boundary
    free0 = free_pages(rt)
    want_result, want = run(rt, testkit, "wait-decode", prompt, "9")
    assert want_result.ok, want_result.error
    batches0, chained0 = rt.query(lambda: (rt.stats.batches, rt.stats.chained_batches))
    engine = _slow_engine(rt, 0.03)
    try:
        result, messages = run(rt, testkit, "chain-decode", prompt, "8")
    finally:
        del engine.execute
    batches, chained = rt.query(lambda: (rt.stats.batches, rt.stats.chained_batches))
    assert result.ok, result.error
    got = json.loads(messages[0])
    assert got["tokens"] == json.loads(want[0])[:8]
    assert got["settled"] == json.loads(want[0])[8]
    # The prefill, then the 8 passes ahead (the last one settled), each sent early.
    assert (batches - batches0, chained - chained0) == (9, 8)
    assert free_pages(rt) == free0


def test_chained_steps_of_many_guests_share_one_batch_per_step(rt: Any, testkit: str) -> None:
    steps, n = 8, 6
    prompts = [f"{5 + i},{6 + i},{7 + i}" for i in range(n)]
    solo = [json.loads(run(rt, testkit, "wait-decode", p, str(steps))[1][0]) for p in prompts]
    free0 = free_pages(rt)
    handles, sizes = _decode_together(rt, testkit, "chain-decode", prompts, steps)
    assert [json.loads(h.recv(5))["tokens"] for h in handles] == solo
    assert sum(sizes) == n * (steps + 1)  # each guest's prefill and 8 passes ahead
    # One batch per step once the prefills are in (they may arrive in two batches).
    assert len(sizes) <= steps + 3, sizes
    assert free_pages(rt) == free0


def test_a_pass_ahead_that_has_not_run_is_dropped_when_settled(rt: Any, testkit: str) -> None:
    # Under the `k` policy with k far above one guest's passes, a pass ahead waits until
    # its guest sleeps; the guest settles it before that: dropped, never run.
    free0 = free_pages(rt)
    want_result, want = run(rt, testkit, "wait-decode", "5,6,7", "4")
    assert want_result.ok, want_result.error
    saved = rt.reconfigure(batch_policy="k", batch_k=64)
    try:
        start = rt.query(lambda: rt.stats.forward_cmds)
        result, messages = run(rt, testkit, "chain-decode", "5,6,7", "4")
        passes = rt.query(lambda: rt.stats.forward_cmds) - start
    finally:
        rt.reconfigure(saved)
    assert result.ok, result.error
    assert json.loads(messages[0]) == {"tokens": json.loads(want[0]), "settled": None}
    assert passes == 4  # the prefill and three passes ahead; the fourth was dropped
    assert free_pages(rt) == free0


def test_waiting_on_a_pass_ahead_that_was_never_queued_is_a_clear_error(
    rt: Any, testkit: str
) -> None:
    free0 = free_pages(rt)
    result, _ = run(rt, testkit, "chain-nothing-ahead")
    assert not result.ok
    assert "no tokens and no pass ahead to wait for" in (result.error or "")
    assert free_pages(rt) == free0


def test_an_instance_killed_while_asleep_in_step_wait_frees_everything(
    rt: Any, testkit: str
) -> None:
    free0 = free_pages(rt)
    start = rt.query(lambda: rt.stats.forward_cmds)
    h = rt.launch(testkit, ["wait-decode", "5,6,7", "1000"])  # 63 of the 96 pages
    deadline = time.monotonic() + 30
    while rt.query(lambda: rt.stats.forward_cmds) < start + 3:  # it is decoding
        assert time.monotonic() < deadline
        time.sleep(0.01)
    h.kill()
    result = h.wait(30)
    assert not result.ok
    assert free_pages(rt) == free0
    assert run(rt, testkit, "wait-decode", "5,6,7", "3")[0].ok  # still serving


def test_a_waited_step_that_cannot_run_is_an_error_result(rt: Any, testkit: str) -> None:
    free0 = free_pages(rt)
    result, messages = run(rt, testkit, "wait-invalid")
    assert result.ok, result.error
    assert messages == ["error:the forward pass has no input tokens"]
    assert free_pages(rt) == free0


def test_generate_fast_path_matches_the_engine(rt: Any, testkit: str, tiny_dir: Any) -> None:
    text = "Once upon a time"
    result, messages = run(rt, testkit, "generate", text, "9")
    assert result.ok, result.error
    out = json.loads(messages[0])
    prompt = rt.tokenizer.encode(text, add_special_tokens=False)
    llm = LLM(str(tiny_dir), num_pages=32)
    ref = llm.generate([prompt], SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True))
    assert out["tokens"] == ref[0].token_ids
    assert out["finish"] == "length"
    # The KV holds the prompt and every generated token but the last (still pending).
    assert out["last"] == (len(prompt) + 9 - 1 - 1) % 16 + 1


def test_generate_streams_tokens_to_the_client(rt: Any, testkit: str) -> None:
    result, messages = run(rt, testkit, "generate", "Once upon a time", "6", "stream")
    assert result.ok, result.error
    final = json.loads(messages[-1])
    assert "".join(messages[:-1]) == final["text"]
    assert len(messages) > 1


def test_four_forks_ride_one_batch_and_match_the_parent(rt: Any, testkit: str) -> None:
    before = len(rt.stats.batch_sizes)
    result, messages = run(rt, testkit, "fork", ",".join(map(str, CTX)))
    assert result.ok, result.error
    sizes = list(rt.stats.batch_sizes)[before:]
    assert 4 in sizes, sizes  # the four forks' passes were one engine batch
    engine = rt.worker.stats().recent_batches
    assert (4, 4) in engine  # 4 sequences, 4 tokens
    out = json.loads(messages[0])
    parent_ids, parent_probs = out["parent"]
    fork_ids, fork_probs = out["forks"][0]  # same token as the parent over shared pages
    assert fork_ids == parent_ids
    assert fork_probs == pytest.approx(parent_probs, rel=1e-5, abs=1e-7)
    assert out["forks"][1][0] != parent_ids  # another token gives another distribution


def test_guests_in_lockstep_share_one_batch_per_step(rt: Any, testkit: str) -> None:
    """Twelve guests decoding together on an engine whose step (30 ms, as a larger model's)
    outlasts their turns: whatever order their first passes arrive in, the decode steps
    merge into one batch per step (cohorts that alternate on the engine would take about
    twice the batches), and each guest's tokens are its solo tokens."""
    steps, n = 10, 12
    prompts = [f"{5 + i},{6 + i},{7 + i}" for i in range(n)]
    solo = [json.loads(rt.launch(testkit, ["decode", p, str(steps)]).recv(30)) for p in prompts]
    handles, sizes = _decode_together(rt, testkit, "decode", prompts, steps)
    assert [json.loads(h.recv(5)) for h in handles] == solo
    assert sum(sizes) == n * steps
    # A guest its time slice cut short can miss a step's batch (it rides the next one),
    # so a few more batches than steps; two cohorts would need about twice as many.
    assert len(sizes) <= steps + 4, sizes


def test_runaway_guest_is_preempted_then_killed(rt: Any, testkit: str) -> None:
    free0 = free_pages(rt)
    spinner = rt.launch(testkit, ["spin"])
    time.sleep(0.2)
    t0 = time.perf_counter()
    result, _ = run(rt, testkit, "decode", "5,6,7", "4")
    others_took = time.perf_counter() - t0
    assert result.ok and not spinner.done  # others progress while the spinner still runs
    assert others_took < 1.0
    end = spinner.wait(30)
    assert not end.ok and "CPU budget" in (end.error or "")
    assert free_pages(rt) == free0


def test_memory_cap_traps_the_guest(rt: Any, testkit: str) -> None:
    free0 = free_pages(rt)
    result, _ = run(rt, testkit, "grow")
    assert not result.ok and "trap" in (result.error or "")
    assert free_pages(rt) == free0
    assert run(rt, testkit, "hello")[0].ok  # the server keeps serving


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("forge", "KV page id 12345 is not held by this inferlet"),
        ("step-forge", "KV page id 12345 is not held by this inferlet"),
        ("wait-forge", "KV page id 12345 is not held by this inferlet"),
        ("import-unknown", "no KV pages are exported under the name 'no-such-export'"),
        ("flood", "more than 200 unread messages to the client"),
    ],
)
def test_bad_guests_get_clear_errors(rt: Any, testkit: str, mode: str, expected: str) -> None:
    free0 = free_pages(rt)
    result, _ = run(rt, testkit, mode)
    assert not result.ok
    assert expected in (result.error or "")
    assert free_pages(rt) == free0
    assert run(rt, testkit, "hello")[0].ok


def test_persistent_export_outlives_its_exporter(rt: Any, testkit: str) -> None:
    free0 = free_pages(rt)
    result, messages = run(rt, testkit, "export", "shared-ctx", "persistent")
    assert result.ok and messages == ["exported"]
    assert free_pages(rt) == free0 - 2  # the export still holds its two pages
    result, messages = run(rt, testkit, "import", "shared-ctx")
    assert result.ok, result.error
    assert json.loads(messages[0]) == {"pages": 2, "exports": [["shared-ctx", 2]]}
    assert rt.query(lambda: rt.exports.remove("shared-ctx"))
    assert free_pages(rt) == free0


def test_plain_export_ends_with_its_exporter(rt: Any, testkit: str) -> None:
    free0 = free_pages(rt)
    result, _ = run(rt, testkit, "export", "short-lived", "plain")
    assert result.ok
    assert rt.query(lambda: "short-lived" not in rt.exports.exports)
    assert free_pages(rt) == free0


def test_wait_policy_holds_the_allocation_until_pages_return(rt: Any, testkit: str) -> None:
    free0 = free_pages(rt)
    holder = rt.launch(testkit, ["hold", str(free0 - 1)])
    assert holder.recv(timeout=30) == "holding"
    waiter = rt.launch(testkit, ["decode", "5,6,7", "30"])  # needs 3 pages
    time.sleep(0.3)
    assert not waiter.done  # waiting, not killed
    holder.send("release")
    assert holder.wait(30).ok
    assert waiter.wait(30).ok
    assert free_pages(rt) == free0


def test_kill_newest_policy_terminates_the_newer_instance(rt: Any, testkit: str) -> None:
    free0 = free_pages(rt)
    saved = rt.reconfigure(out_of_pages="kill-newest")
    try:
        older = rt.launch(testkit, ["echo"])  # launched first: it has priority
        newer = rt.launch(testkit, ["hold", str(free0 - 1)])
        assert newer.recv(timeout=30) == "holding"
        needy = rt.launch(testkit, ["decode", "5,6,7", "30"])  # newest of all: it traps
        end = needy.wait(30)
        assert not end.ok and "out of KV pages" in (end.error or "")
        older.send("x")
        assert older.wait(30).ok
        newer.send("release")
        assert newer.wait(30).ok
        # Now the requester is older than the holder: the holder is the one terminated.
        holder = rt.launch(testkit, ["hold", str(free0 - 1)])
        assert holder.recv(timeout=30) == "holding"
        time.sleep(0.05)
        end = holder.wait(0.01) if holder.done else None
        assert end is None
    finally:
        rt.reconfigure(saved)
    holder.send("release")
    holder.wait(30)
    assert free_pages(rt) == free0


@pytest.mark.slow
def test_a_thousand_concurrent_inferlets_all_finish_correctly(
    tiny_dir: Any, program_cache: Any, testkit_wasm: bytes
) -> None:
    """1000 Python inferlets x 50 forward calls each; results match a single-guest run."""
    from loom.config import EngineConfig, RuntimeConfig
    from loom.runtime.runtime import start_runtime

    n, steps = 1000, 49  # prefill + 49 decode steps = 50 forward calls each
    prompts = [f"{5 + i % 7},6,7" for i in range(n)]
    rt = start_runtime(
        EngineConfig(model=str(tiny_dir), num_pages=n * 4 + 64),
        RuntimeConfig(page_wait_timeout_s=600),
        worker_mode="thread",
        cache_dir=program_cache,
    )
    try:
        program = rt.add_program(testkit_wasm)
        solo = {}
        for p in sorted(set(prompts)):  # the reference: each prompt decoded alone
            h = rt.launch(program, ["decode", p, str(steps)])
            assert h.wait(120).ok
            solo[p] = json.loads(h.recv(1))
        free0 = free_pages(rt)
        handles = [rt.launch(program, ["decode", p, str(steps)]) for p in prompts]
        results = [h.wait(1200) for h in handles]
        assert all(r.ok for r in results), next(r.error for r in results if not r.ok)
        for p, h in zip(prompts, handles, strict=True):
            assert json.loads(h.recv(1)) == solo[p]
        assert max(rt.stats.batch_sizes) > 100  # they really ran together
        assert free_pages(rt) == free0
    finally:
        rt.close()


@pytest.mark.parametrize("policy", ["k", "t", "k_or_t"])
def test_every_policy_finishes_fewer_guests_than_k(rt: Any, testkit: str, policy: str) -> None:
    """k = 64 with 3 guests must not wait forever; results equal the adaptive policy's."""
    from loom.runtime.runtime import RuntimeStats

    prompts = ["5,6,7", "9,8", "3,3,3,3"]
    baseline = [json.loads(rt.launch(testkit, ["decode", p, "6"]).recv(30)) for p in prompts]
    saved = rt.reconfigure(batch_policy=policy, batch_k=64, batch_t_ms=5.0)
    try:
        rt.query(lambda: setattr(rt, "stats", RuntimeStats()))
        handles = [rt.launch(testkit, ["decode", p, "6"]) for p in prompts]
        assert all(h.wait(60).ok for h in handles)
        assert [json.loads(h.recv(5)) for h in handles] == baseline
        sizes = list(rt.stats.batch_sizes)
        assert sum(sizes) == 3 * 6 and max(sizes) <= 3
        if policy == "k":  # fires only when every guest waits: the guests run in lockstep
            assert max(sizes) == 3
    finally:
        rt.reconfigure(saved)


class _Echo(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        reply = b"echo:" + body + b":" + self.headers["x-test"].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: Any) -> None:
        pass


def test_http_fetch_reaches_allowed_hosts_only(rt: Any, testkit: str) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/x"
    saved = rt.config
    try:
        denied = rt.launch(testkit, ["http", url]).wait(30)
        assert not denied.ok and "not allowed by the server's HTTP policy" in (denied.error or "")
        rt.reconfigure(http_allow_hosts=("127.0.0.1",))
        h = rt.launch(testkit, ["http", url])
        assert h.wait(30).ok
        assert h.recv(5) == "200 echo:ping:1"
    finally:
        rt.reconfigure(saved)
        server.shutdown()


def test_an_inferlet_launches_a_child(rt: Any, testkit: str) -> None:
    parent = rt.launch(testkit, ["spawn", testkit, "child-key", "from the child"])
    assert parent.wait(30).ok
    child_id = parent.recv(5)
    assert child_id and child_id != parent.id
    deadline = time.monotonic() + 30
    while rt.query(lambda: rt.messaging.store_kv.get("child-key")) is None:
        assert time.monotonic() < deadline, "the child never ran"
        time.sleep(0.02)
    assert rt.query(lambda: rt.messaging.store_kv.get("child-key")) == "from the child"
    bad = rt.launch(testkit, ["spawn", "no-such-program", "k", "v"]).wait(30)
    assert not bad.ok and "no-such-program" in (bad.error or "")


def test_generation_chunks_in_the_worker_equal_step_by_step(rt: Any, testkit: str) -> None:
    """Generations the worker continues on its own give the same tokens, text and pages
    as one round trip per token, in fewer batches, and return unused pages."""
    from loom.runtime.runtime import RuntimeStats

    free0 = free_pages(rt)
    outs = {}
    saved = rt.config
    try:
        for chunk in (0, 5):
            rt.reconfigure(generate_chunk=chunk)
            rt.query(lambda: setattr(rt, "stats", RuntimeStats()))
            handles = [rt.launch(testkit, ["generate", text, "23"])
                       for text in ("Once upon a time", "The quick brown fox")]  # fmt: skip
            assert all(h.wait(60).ok for h in handles)
            outs[chunk] = ([json.loads(h.recv(5)) for h in handles], rt.stats.batches,
                           rt.stats.continued_tokens)  # fmt: skip
    finally:
        rt.reconfigure(saved)
    (plain, plain_batches, none), (chunked, chunked_batches, continued) = outs[0], outs[5]
    assert none == 0 and continued > 0
    assert chunked == plain
    assert chunked_batches < plain_batches
    assert free_pages(rt) == free0


def test_a_lone_decode_loop_costs_one_loop_turn_per_step(rt: Any, testkit: str) -> None:
    # A turn that finds nothing to do still looks at the inbox, the engine and every
    # queue: a guest's pokes are answered where its pass is fired, not by a second turn
    # before the loop sleeps.
    steps = 30
    before = rt.query(lambda: (rt.stats.turns, rt.stats.batches))
    result, _ = run(rt, testkit, "decode", "5,6,7", str(steps))
    assert result.ok, result.error
    turns, batches = (
        b - a
        for a, b in zip(before, rt.query(lambda: (rt.stats.turns, rt.stats.batches)), strict=True)
    )
    assert batches == steps  # the prompt, then a pass per token after the first
    # Measured: 34 turns for 30 steps (starting, ending); two turns per step gave 64. The
    # slack is for preemptions on a loaded machine.
    assert turns <= batches + batches // 2, (turns, batches)
