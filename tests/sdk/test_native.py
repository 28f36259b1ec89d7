"""Native (C and Zig) inferlets on the C ABI: built with zig, run by the same runtime."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from loom import LLM, SamplingParams
from loom.sdk.build import BuildError, build_inferlet
from tests.runtime_helpers import free_pages

INFERLETS = Path(__file__).resolve().parents[2] / "inferlets"


@pytest.fixture(scope="module")
def native_programs(srt: Any) -> dict[str, str]:
    return {
        lang: srt.add_program(build_inferlet(INFERLETS / path).read_bytes())
        for lang, path in (("c", "c_completion/app.c"), ("zig", "zig_greedy/app.zig"))
    }


@pytest.mark.parametrize("lang", ["c", "zig"])
def test_native_completion_equals_the_engine(
    srt: Any, native_programs: dict[str, str], tiny_dir: Any, lang: str
) -> None:
    free0 = free_pages(srt)
    text = "Once upon a time there"
    h = srt.launch(native_programs[lang], [text, "12"])
    result = h.wait(60)
    assert result.ok, result.error
    prompt = srt.tokenizer.encode(text, add_special_tokens=False)
    ref = LLM(str(tiny_dir), num_pages=32).generate(
        [prompt], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    )[0]
    assert h.recv(5) == srt.tokenizer.decode(ref.token_ids)
    assert free_pages(srt) == free0


SETTLE_C = r"""#include "loom.h"
/* Three chained steps from tokens 5,6,7, then settle the pass ahead: send the four
 * tokens and, after a second settle (nothing ahead), its answer. */
static uint32_t toks[3] = {5, 6, 7};
static uint32_t pages[2];
static char out[64];
static int32_t put(int32_t at, int32_t v) {
    if (v < 0) { out[at++] = '-'; v = -v; }
    char d[12]; int32_t k = 0;
    do { d[k++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (k) out[at++] = d[--k];
    out[at++] = ' ';
    return at;
}
LOOM_EXPORT(run) int32_t run(void) {
    int32_t q = loom_queue(loom_model());
    loom_allocate(q, 2, pages);
    int32_t at = 0;
    at = put(at, loom_step_chain(q, toks, 3, 0, pages, 1, 3, 1, 4, 0.0f, 0, 1.0f));
    at = put(at, loom_step_chain(q, toks, 0, 0, pages, 0, 0, 1, 5, 0.0f, 0, 1.0f));
    at = put(at, loom_step_chain(q, toks, 0, 0, pages, 0, 0, 1, 6, 0.0f, 0, 1.0f));
    at = put(at, loom_step_settle(q));
    at = put(at, loom_step_settle(q));
    loom_send(out, at - 1);
    loom_free(q, pages, 2);
    return 0;
}
"""


def test_native_chained_steps_and_settle(srt: Any, tiny_dir: Any, tmp_path: Path) -> None:
    free0 = free_pages(srt)
    app = tmp_path / "settle.c"
    app.write_text(SETTLE_C)
    program = srt.add_program(build_inferlet(app, cache_dir=tmp_path).read_bytes())
    # A step longer than the guest's turns (as a larger model's): each pass ahead has
    # reached the engine before the guest gets the token it follows.
    engine = srt.worker._runner.engine
    execute = engine.execute
    engine.execute = lambda batch: (time.sleep(0.03), execute(batch))[1]
    try:
        h = srt.launch(program, [])
        result = h.wait(30)
    finally:
        del engine.execute
    assert result.ok, result.error
    ref = LLM(str(tiny_dir), num_pages=32).generate(
        [[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    )[0]
    # So the settled pass ahead gives the fourth token; a second settle finds nothing.
    assert [int(x) for x in h.recv(5).split()] == [*ref.token_ids, -1]
    assert free_pages(srt) == free0


def test_native_errors_are_clear(srt: Any, native_programs: dict[str, str]) -> None:
    result = srt.launch(native_programs["c"], ["only a prompt"]).wait(30)
    assert not result.ok and result.error == "usage: prompt max_tokens"


def test_out_of_bounds_pointers_trap_with_a_message(srt: Any, tmp_path: Path) -> None:
    app = tmp_path / "bad.c"
    app.write_text(
        '#include "loom.h"\n'
        "LOOM_EXPORT(run) int32_t run(void) {\n"
        "    loom_send((const char *)0x7ffffff0, 64);  /* far outside memory */\n"
        "    return 0;\n"
        "}\n"
    )
    program = srt.add_program(build_inferlet(app, cache_dir=tmp_path).read_bytes())
    result = srt.launch(program, []).wait(30)
    assert not result.ok and "memory access out of bounds" in (result.error or "")
    # The server keeps serving.
    ok = tmp_path / "ok.c"
    ok.write_text('#include "loom.h"\nLOOM_EXPORT(run) int32_t run(void) {\n'
                  '    loom_send("fine", 4);\n    return 0;\n}\n')  # fmt: skip
    h = srt.launch(srt.add_program(build_inferlet(ok, cache_dir=tmp_path).read_bytes()), [])
    assert h.wait(30).ok and h.recv(5) == "fine"


def test_native_build_errors_name_the_line(tmp_path: Path) -> None:
    app = tmp_path / "broken.c"
    app.write_text('#include "loom.h"\nint32_t run(void) { return missing; }\n')
    with pytest.raises(BuildError, match=r"broken\.c:2:.*missing"):
        build_inferlet(app, cache_dir=tmp_path)
