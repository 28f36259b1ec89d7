"""Output validation: score candidate answers by their probability under the model and
keep the most likely (a classifier, a multiple-choice answer, a check of a generated
claim) — each candidate in one teacher-forced pass, all candidates together.

    loom run inferlets/output_validation -- "The capital of France is" " Paris" " Rome"

Arguments: ``[--separate] prompt candidate...`` (``--separate``: each candidate a
separate prompt, the naive baseline). A candidate's score is the mean log-probability of
its tokens (normalized for length). The prompt is computed once; each candidate scores
in a fork sharing its full pages. The reply is JSON: ``{"best", "scores": [{"candidate",
"mean_logprob", "logprobs"}, ...]}`` in the candidates' order.
"""

import json

import inferlet
from inferlet.sharing import branch


async def main(args: list[str]) -> str | None:
    share = not (args and args[0] == "--separate")
    args = args if share else args[1:]
    if len(args) < 3:
        raise ValueError("usage: prompt candidate candidate [candidate...]")
    prompt, candidates = args[0], args[1:]
    model = inferlet.get_model()
    ctx = model.create_context()
    ctx.fill(prompt)
    if share:
        ctx.flush()
    forks = [branch(ctx, share) for _ in candidates]
    token_lists = [model.tokenizer.encode(c) for c in candidates]
    if any(not t for t in token_lists):
        raise ValueError("every candidate needs at least one token")
    scored = await inferlet.gather(*(f.score(t) for f, t in zip(forks, token_lists, strict=True)))
    scores = [
        {"candidate": c, "logprobs": lps, "mean_logprob": sum(lps) / len(lps)}
        for c, lps in zip(candidates, scored, strict=True)
    ]
    for f in forks:
        f.release()
    ctx.release()
    best = max(scores, key=lambda s: s["mean_logprob"])["candidate"]
    return json.dumps({"best": best, "scores": scores})
