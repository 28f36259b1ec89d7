import pytest
import torch

from loom.engine.batch import OutputSpec, SamplerSpec
from loom.engine.masks import encode_brle
from loom.engine.sampler import sample
from loom.errors import RequestError


def logits_rows(n: int, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax() -> None:
    x = logits_rows(4)
    res = sample(x, [OutputSpec(i, SamplerSpec()) for i in range(4)])
    assert [r.token for r in res] == x.argmax(-1).tolist()


def test_seed_gives_same_token_whatever_the_batch() -> None:
    x = logits_rows(6)
    spec = SamplerSpec(temperature=1.0, seed=1234)
    alone = sample(x[2:3], [OutputSpec(0, spec)])[0].token
    mixed = sample(
        x,
        [OutputSpec(i, SamplerSpec(temperature=0.7, seed=i)) for i in range(2)]
        + [OutputSpec(2, spec)]
        + [OutputSpec(i, SamplerSpec(temperature=1.0)) for i in range(3, 6)],
    )
    assert mixed[2].token == alone
    # Different seeds do not all agree.
    draws = {sample(x[2:3], [OutputSpec(0, SamplerSpec(1.0, seed=s))])[0].token for s in range(40)}
    assert len(draws) > 1


def test_sampling_matches_softmax_frequencies() -> None:
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    res = sample(x, [OutputSpec(i, SamplerSpec(temperature=1.0)) for i in range(4000)])
    freq = torch.bincount(torch.tensor([r.token for r in res]), minlength=4).float() / 4000
    torch.testing.assert_close(freq, torch.softmax(x[0], -1), atol=0.03, rtol=0)


def test_top_k_top_p_min_p_restrict_support() -> None:
    x = logits_rows(1, vocab=30, seed=5).repeat(300, 1)
    probs = torch.softmax(x[0], -1)
    order = probs.argsort(descending=True).tolist()
    cases = {
        "top_k": (SamplerSpec(1.5, top_k=3), set(order[:3])),
        "min_p": (
            SamplerSpec(1.0, min_p=0.3),
            {i for i in range(30) if probs[i] >= 0.3 * probs.max()},
        ),
    }
    cum, nucleus = 0.0, set()
    for i in order:  # smallest prefix of the sorted distribution reaching 0.6
        nucleus.add(i)
        cum += float(probs[i])
        if cum >= 0.6:
            break
    cases["top_p"] = (SamplerSpec(1.0, top_p=0.6), nucleus)
    for name, (spec, allowed) in cases.items():
        got = {r.token for r in sample(x, [OutputSpec(i, spec) for i in range(300)])}
        assert got <= allowed, name
        assert len(got) > 1 or len(allowed) == 1, name


def test_logit_mask_forbids_tokens() -> None:
    x = logits_rows(1, vocab=10)
    best = int(x.argmax())
    forbid = [i == best for i in range(10)]
    res = sample(x, [OutputSpec(0, SamplerSpec(), logit_mask=encode_brle(forbid))])
    assert res[0].token != best
    assert res[0].token == int(x[0].masked_fill(torch.tensor(forbid), -1e9).argmax())


def test_logit_bias_moves_sampling_and_leaves_logprobs() -> None:
    x = logits_rows(3)
    weakest = x.argmin(-1).tolist()
    specs = [
        OutputSpec(i, SamplerSpec(), logprobs=0, logit_bias=((weakest[i],), (100.0,)))
        for i in range(3)
    ]
    res = sample(x, specs)
    assert [r.token for r in res] == weakest  # the bias made the least likely the argmax
    want = torch.log_softmax(x, -1)  # reported under the model's own distribution
    assert all(abs(r.logprob - float(want[i, weakest[i]])) < 1e-5 for i, r in enumerate(res))
    # A bias of +1 on half the vocabulary shifts sampled mass to it: e/(1+e) ~ 0.73 of
    # draws on flat logits.
    flat = torch.zeros(4000, 10)
    half = (tuple(range(5)), (1.0,) * 5)
    draws = sample(flat, [OutputSpec(i, SamplerSpec(1.0), logit_bias=half) for i in range(4000)])
    share = sum(r.token < 5 for r in draws) / 4000  # type: ignore[operator]
    assert abs(share - 0.731) < 0.03
    assert torch.equal(flat, torch.zeros(4000, 10))  # the caller's logits untouched


def test_logprobs_and_distributions() -> None:
    x = logits_rows(2)
    lp = torch.log_softmax(x, -1)
    res = sample(x, [OutputSpec(0, SamplerSpec(), logprobs=3), OutputSpec(1, top_k_dist=5)])
    assert res[0].logprob == pytest.approx(float(lp[0].max()), abs=1e-6)
    assert [i for i, _ in res[0].top_logprobs] == lp[0].topk(3).indices.tolist()
    assert res[1].token is None and res[1].logprob is None
    assert res[1].top_ids == x[1].topk(5).indices.tolist()
    assert res[1].top_probs == pytest.approx(torch.softmax(x[1], -1).topk(5).values.tolist())


@pytest.mark.parametrize(
    "spec",
    [
        SamplerSpec(temperature=-0.1),
        SamplerSpec(top_p=0.0),
        SamplerSpec(top_p=1.5),
        SamplerSpec(min_p=2.0),
        SamplerSpec(top_k=-1),
        SamplerSpec(temperature=float("nan")),
    ],
)
def test_bad_sampler_values_are_rejected(spec: SamplerSpec) -> None:
    with pytest.raises(RequestError):
        spec.validate()
