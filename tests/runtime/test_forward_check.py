"""The host's per-call forward-pass check agrees with ``ForwardBatch.validate``."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

from loom.engine.batch import ForwardBatch, OutputSpec, SamplerSpec
from loom.runtime.host.forward_pass import ForwardPassBuilder, _check

VOCAB, PAGE, NUM_PAGES = 50, 4, 32
RT: Any = SimpleNamespace(
    vocab_size=VOCAB, page_size=PAGE, max_model_len=1 << 20, pool=SimpleNamespace()
)


def _random_pass(rng: random.Random) -> tuple[ForwardPassBuilder, list[OutputSpec]]:
    n = rng.randint(1, 4)
    tokens = [rng.choice([rng.randrange(VOCAB), -1, VOCAB]) if rng.random() < 0.1
              else rng.randrange(VOCAB) for _ in range(n)]  # fmt: skip
    positions = [rng.randint(-1, 12) if rng.random() < 0.1 else rng.randint(0, 12)
                 for _ in range(n + (rng.random() < 0.05))]  # fmt: skip
    pages = [rng.randrange(NUM_PAGES) for _ in range(rng.randint(1, 3))]
    last = rng.randint(0, PAGE + 1) if rng.random() < 0.2 else rng.randint(1, PAGE)
    kv = PAGE * (len(pages) - 1) + last
    masks = None
    if rng.random() < 0.4:
        masks = []
        for i in range(n + (rng.random() < 0.1)):
            want = kv - n + i + 1 + (rng.random() < 0.1)
            masks.append([max(0, want)] if rng.random() < 0.5 else [1, max(0, want - 1)])
    sampler = SamplerSpec(0.0, 0, 1.0, 0.0, None)
    outputs = [
        OutputSpec(
            rng.randint(-1, n) if rng.random() < 0.2 else rng.randrange(n),
            sampler,
            0,
            None,
            None if rng.random() < 0.7 else [VOCAB - 3, 3 + (rng.random() < 0.3)],
        )
        for _ in range(rng.randint(0, 2))
    ]
    fp = ForwardPassBuilder(queue=None, tokens=tokens, positions=positions, pages=pages,  # type: ignore[arg-type]
                            last_page_len=last, masks=masks)  # fmt: skip
    return fp, outputs


def _validate(fp: ForwardPassBuilder, outputs: list[OutputSpec]) -> bool:
    batch = ForwardBatch(
        token_ids=fp.tokens,
        positions=fp.positions,
        seq_indptr=[0, len(fp.tokens)],
        page_tables=[fp.pages],
        last_page_lens=[fp.last_page_len],
        outputs=outputs,
        masks=[fp.masks] if fp.masks is not None else None,
    )
    try:
        batch.validate(NUM_PAGES, PAGE, VOCAB)
    except ValueError:
        return False
    return True


def test_check_agrees_with_batch_validation() -> None:
    rng = random.Random(7)
    verdicts = {True: 0, False: 0}
    for _ in range(3000):
        fp, outputs = _random_pass(rng)
        ok = _check(fp, outputs, RT) is None
        assert ok == _validate(fp, outputs), (fp, outputs, _check(fp, outputs, RT))
        verdicts[ok] += 1
    # Both verdicts are well represented, so the agreement means something.
    assert min(verdicts.values()) > 300, verdicts


def test_check_names_the_problem() -> None:
    fp = ForwardPassBuilder(queue=None, tokens=[1, 2], positions=[0, 1], pages=[0],  # type: ignore[arg-type]
                            last_page_len=1)  # fmt: skip
    assert "exceed its KV length" in (_check(fp, [], RT) or "")
    fp.last_page_len = 2
    assert _check(fp, [], RT) is None
    assert "output index 2" in (_check(fp, [OutputSpec(2)], RT) or "")
    fp.positions = [0, 1 << 20]
    assert "context length" in (_check(fp, [], RT) or "")


def test_forward_output_groups_results_by_request_kind() -> None:
    import math

    from loom.engine.batch import OutputResult
    from loom.runtime.host.forward_pass import forward_output

    greedy = SamplerSpec(0.0, 0, 1.0, 0.0, None)
    specs = [
        OutputSpec(0, None, 2, None),  # distribution only
        OutputSpec(1, greedy, 0, 2),  # token + its logprob + top-2 logprobs
        OutputSpec(2, None, 0, 0),  # logprob asked where nothing was sampled
        OutputSpec(3, greedy),  # token only
    ]
    results = [
        OutputResult(top_ids=[4, 5], top_probs=[0.6, 0.3]),
        OutputResult(token=9, logprob=-0.1, top_logprobs=[(9, -0.1), (2, -2.5)]),
        OutputResult(),
        OutputResult(token=11),
    ]
    tokens, logprobs, top_ids, top_lps, dist_ids, dist_probs = forward_output(specs, results)
    assert tokens == [9, 11]
    assert logprobs[0] == -0.1 and math.isnan(logprobs[1]) and len(logprobs) == 2
    assert (top_ids, top_lps) == ([9, 2], [-0.1, -2.5])
    assert (dist_ids, dist_probs) == ([4, 5], [0.6, 0.3])
