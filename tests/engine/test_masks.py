import torch

from loom.engine.masks import decode_brle, decode_rows, encode_brle


def test_decode_examples() -> None:
    assert decode_brle([3, 2, 4]).tolist() == [False] * 3 + [True] * 2 + [False] * 4
    assert decode_brle([0, 2, 3]).tolist() == [True, True, False, False, False]
    assert decode_brle([5]).tolist() == [False] * 5


def test_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        bits = torch.rand(int(torch.randint(1, 40, (1,), generator=g)), generator=g) > 0.5
        assert decode_brle(encode_brle(bits.tolist())).tolist() == bits.tolist()


def test_rows_cover_context_plus_own_prefix() -> None:
    allowed = decode_rows([[2], [1, 1, 1]], width=3, device=torch.device("cpu"))
    assert allowed.tolist() == [[True, True, False], [True, False, True]]
