import pytest

from loom.engine.batch import ForwardBatch, OutputSpec


def batch(**kw: object) -> ForwardBatch:
    base: dict[str, object] = dict(
        token_ids=[1, 2, 3],
        positions=[0, 1, 2],
        seq_indptr=[0, 3],
        page_tables=[[0]],
        last_page_lens=[3],
        outputs=[OutputSpec(2)],
    )
    base.update(kw)
    return ForwardBatch(**base)  # type: ignore[arg-type]


def test_valid_batch_passes() -> None:
    batch().validate(num_pages=4, page_size=4, vocab_size=10)


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(positions=[0, 1]), "positions"),
        (dict(seq_indptr=[0, 2]), "seq_indptr"),
        (dict(token_ids=[1, 2, 99]), "token id"),
        (dict(page_tables=[[7]]), "page id"),
        (dict(page_tables=[[]]), "empty page table"),
        (dict(last_page_lens=[5]), "last_page_len"),
        (dict(last_page_lens=[2]), "exceed"),
        (dict(outputs=[OutputSpec(3)]), "output index"),
        (dict(masks=[[[1], [2]]]), "mask rows"),
        (dict(masks=[[[1], [2], [2]]]), "mask row 2"),
        (dict(outputs=[OutputSpec(0, logit_mask=[3])]), "logit mask"),
    ],
)
def test_bad_batches_name_the_problem(kw: dict[str, object], msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        batch(**kw).validate(num_pages=4, page_size=4, vocab_size=10)
