"""The decode mirror must be invisible: same logits as gathering pages every step."""

import torch

from loom.engine.batch import ForwardBatch
from loom.engine.model_runner import ModelRunner
from tests.helpers import random_model, single_seq_batch

PS = 4


def decode_batch(tokens: list[int], kv_lens: list[int], tables: list[list[int]]) -> ForwardBatch:
    return ForwardBatch(
        token_ids=tokens,
        positions=[n - 1 for n in kv_lens],
        seq_indptr=list(range(len(tokens) + 1)),
        page_tables=[t[: -(-n // PS)] for t, n in zip(tables, kv_lens, strict=True)],
        last_page_lens=[n - (-(-n // PS) - 1) * PS for n in kv_lens],
    )


def run(runner: ModelRunner, steps: int, copy_at: int | None = None) -> torch.Tensor:
    tables = [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15]]
    prompts = [list(range(5, 14)), list(range(20, 26))]  # 9 and 6 tokens
    for p, t in zip(prompts, tables, strict=True):
        runner.forward_logits(single_seq_batch(p, list(range(len(p))), t, len(p), PS), [0])
    lens = [9, 6]
    out = []
    for step in range(steps):
        if step == copy_at:  # a page copy between steps must force a refill
            runner.cache.copy_slots(0, 0, 0, 0, PS)
        lens = [n + 1 for n in lens]
        b = decode_batch([30 + step, 40 + step], lens, tables)
        out.append(runner.forward_logits(b, [0, 1]))
    return torch.stack(out)


def test_mirror_matches_gathering_every_step() -> None:
    model = random_model()
    with_mirror = ModelRunner(model, num_pages=32, page_size=PS, native_attention=False)
    without = ModelRunner(model, num_pages=32, page_size=PS, native_attention=False)
    without.mirror = None  # type: ignore[assignment]
    got, ref = run(with_mirror, 12), run(without, 12)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    assert with_mirror.mirror.num_filled == 1 and with_mirror.mirror.num_reused == 11


def test_cohort_changes_and_page_copies_refill() -> None:
    model = random_model()
    runner = ModelRunner(model, num_pages=32, page_size=PS, native_attention=False)
    run(runner, 6, copy_at=3)
    # Prefills reset the cohort; the first decode fills, the copy forces a second fill.
    assert runner.mirror.num_filled == 2 and runner.mirror.num_reused == 4
    # A different set of sequences (one dropped) is a new cohort.
    before = runner.mirror.num_filled
    runner.forward_logits(decode_batch([7], [16], [[0, 1, 2, 3, 4, 5, 6, 7]]), [0])
    assert runner.mirror.num_filled == before + 1
