"""Paged attention against full-sequence forwards of the same model."""

import pytest
import torch

from loom.engine.masks import encode_brle
from loom.engine.model_runner import ModelRunner
from loom.kernels import cpu as cpu_kernels
from tests.helpers import random_model, single_seq_batch

PS = 4


@pytest.fixture(autouse=True, params=["kernel", "sdpa"])
def attention_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs twice: through the CPU kernel and through the SDPA path."""
    if request.param == "sdpa":
        monkeypatch.setattr(cpu_kernels, "attention_supported", lambda *a: False)
    else:  # the kernel must build here: a silent fallback would test SDPA twice
        assert cpu_kernels.available()
        # Tested through the engine even on CPUs where SDPA is chosen for speed.
        monkeypatch.setattr(cpu_kernels, "attention_pays_here", lambda: True)
    return str(request.param)


def full_logits(runner: ModelRunner, tokens: list[int], positions: list[int]) -> torch.Tensor:
    """Reference: the whole sequence in one pass, on fresh pages."""
    fresh = ModelRunner(runner.model, num_pages=64, page_size=PS)
    b = single_seq_batch(tokens, positions, list(range(64)), len(tokens), PS)
    return fresh.forward_logits(b, list(range(len(tokens))))


def test_paged_decoding_equals_full_forward() -> None:
    model = random_model()
    runner = ModelRunner(model, num_pages=32, page_size=PS)
    tokens = torch.randint(0, 97, (23,), generator=torch.Generator().manual_seed(1)).tolist()
    pages = [17, 3, 29, 8, 0, 12, 21]  # scattered, out of order
    got = [
        runner.forward_logits(
            single_seq_batch(tokens[:9], list(range(9)), pages, 9, PS), list(range(9))
        )
    ]
    for t in range(9, 23):
        b = single_seq_batch([tokens[t]], [t], pages, t + 1, PS)
        got.append(runner.forward_logits(b, [0]))
    ref = full_logits(runner, tokens, list(range(23)))
    torch.testing.assert_close(torch.cat(got), ref, atol=1e-5, rtol=1e-5)


def test_batched_mixed_prefill_and_decode_equals_separate_runs() -> None:
    model = random_model()
    runner = ModelRunner(model, num_pages=32, page_size=PS)
    g = torch.Generator().manual_seed(2)
    a = torch.randint(0, 97, (10,), generator=g).tolist()
    b = torch.randint(0, 97, (6,), generator=g).tolist()
    # Sequence A: prefill 9 tokens alone, then its 10th token decodes in the same batch
    # as sequence B's 6-token prefill.
    runner.forward_logits(single_seq_batch(a[:9], list(range(9)), [0, 1, 2], 9, PS), [0])
    from loom.engine.batch import ForwardBatch

    mixed = ForwardBatch(
        token_ids=[a[9], *b],
        positions=[9, *range(6)],
        seq_indptr=[0, 1, 7],
        page_tables=[[0, 1, 2], [5, 6]],
        last_page_lens=[2, 2],
    )
    got = runner.forward_logits(mixed, [0, 6])
    torch.testing.assert_close(
        got[0], full_logits(runner, a, list(range(10)))[9], atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        got[1], full_logits(runner, b, list(range(6)))[5], atol=1e-5, rtol=1e-5
    )


def test_tree_mask_gives_each_branch_its_separate_logits() -> None:
    model = random_model()
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(0, 97, (5,), generator=g).tolist()
    br1 = torch.randint(0, 97, (3,), generator=g).tolist()
    br2 = torch.randint(0, 97, (2,), generator=g).tolist()
    runner = ModelRunner(model, num_pages=16, page_size=PS)
    runner.forward_logits(single_seq_batch(prefix, list(range(5)), [0, 1, 2, 3], 5, PS), [0])
    # Both branches in one pass: same positions, each masked off the other.
    ctx = len(prefix)
    rows = []
    for i in range(3):  # branch 1 tokens see prefix + br1[:i+1]
        rows.append(encode_brle([False] * (ctx + i + 1)))
    for j in range(2):  # branch 2 tokens see prefix + br2[:j+1], not branch 1
        rows.append(encode_brle([False] * ctx + [True] * 3 + [False] * (j + 1)))
    tokens = br1 + br2
    positions = [5, 6, 7, 5, 6]
    b = single_seq_batch(tokens, positions, [0, 1, 2, 3], ctx + 5, PS, masks=rows)
    got = runner.forward_logits(b, list(range(5)))
    ref1 = full_logits(runner, prefix + br1, list(range(8)))[5:]
    ref2 = full_logits(runner, prefix + br2, list(range(7)))[5:]
    torch.testing.assert_close(got[:3], ref1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[3:], ref2, atol=1e-5, rtol=1e-5)
    # Without the mask, branch 2 would see branch 1: the logits must differ.
    b2 = single_seq_batch(tokens, positions, [4, 5, 6, 7], ctx + 5, PS)
    runner.forward_logits(single_seq_batch(prefix, list(range(5)), [4, 5], 5, PS), [0])
    unmasked = runner.forward_logits(b2, list(range(5)))
    assert (unmasked[3:] - ref2).abs().max() > 1e-3


def test_masked_slot_equals_brle_exclusion_and_copy_preserves_kv() -> None:
    model = random_model()
    runner = ModelRunner(model, num_pages=16, page_size=PS)
    tokens = list(range(10, 17))  # 7 tokens
    runner.forward_logits(single_seq_batch(tokens, list(range(7)), [0, 1], 7, PS), [0])
    # Hide slot 2 of page 0 through the page mask, then decode one token.
    runner.cache.set_live(0, [True, True, False, True])
    via_live = runner.forward_logits(single_seq_batch([50], [7], [0, 1], 8, PS), [0])
    # Same through a BRLE row on a copy of the pages.
    for off in range(PS):
        runner.cache.copy_slots(0, 4, off, off, 1)
    runner.cache.copy_slots(1, 5, 0, 0, PS)
    runner.cache.set_live(4, [True] * PS)
    row = encode_brle([False, False, True] + [False] * 5)
    via_brle = runner.forward_logits(single_seq_batch([50], [7], [4, 5], 8, PS, masks=[row]), [0])
    torch.testing.assert_close(via_live, via_brle, atol=1e-6, rtol=1e-6)


def test_explicit_positions_are_used() -> None:
    model = random_model()
    runner = ModelRunner(model, num_pages=16, page_size=PS)
    tokens = [5, 6, 7, 8]
    at_zero = runner.forward_logits(single_seq_batch(tokens, [0, 1, 2, 3], [0], 4, PS), [3])
    at_100 = runner.forward_logits(single_seq_batch(tokens, [100, 101, 102, 103], [1], 4, PS), [3])
    # RoPE is relative: shifting every position leaves attention logits unchanged...
    torch.testing.assert_close(at_zero, at_100, atol=1e-4, rtol=1e-4)
    # ...but a gap between tokens changes them.
    gapped = runner.forward_logits(single_seq_batch(tokens, [0, 1, 2, 40], [2], 4, PS), [3])
    assert (gapped - at_zero).abs().max() > 1e-3


def test_decodes_interleaved_with_a_continuation_attend_in_groups() -> None:
    """Decode tokens around a multi-token continuation: each group attends on its own
    (decodes unpadded) and every output lands on its own row."""
    from loom.engine.batch import ForwardBatch

    model = random_model()
    runner = ModelRunner(model, num_pages=32, page_size=PS)
    g = torch.Generator().manual_seed(3)
    a, b, c = (torch.randint(0, 97, (n,), generator=g).tolist() for n in (8, 11, 6))
    tables = [[0, 1, 2], [4, 5, 6], [8, 9]]
    for seq, table, n in ((a, tables[0], 7), (b, tables[1], 7), (c, tables[2], 5)):
        runner.forward_logits(single_seq_batch(seq[:n], list(range(n)), table, n, PS), [0])
    mixed = ForwardBatch(
        token_ids=[a[7], *b[7:11], c[5]],
        positions=[7, 7, 8, 9, 10, 5],
        seq_indptr=[0, 1, 5, 6],
        page_tables=tables,
        last_page_lens=[4, 3, 2],
    )
    got = runner.forward_logits(mixed, [0, 1, 2, 3, 4, 5])
    torch.testing.assert_close(
        got[0], full_logits(runner, a, list(range(8)))[7], atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        got[1:5], full_logits(runner, b, list(range(11)))[7:11], atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        got[5], full_logits(runner, c, list(range(6)))[5], atol=1e-5, rtol=1e-5
    )
