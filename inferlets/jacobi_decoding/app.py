"""Jacobi decoding: guess the next ``k`` tokens, run them through one pass, and take the
model's predictions as the next guess; the tokens where guess and prediction agree are
fixed. It converges to exactly the greedy output, in fewer passes where the text lets
several tokens settle at once.

    loom run inferlets/jacobi_decoding -- "Once upon a time" 64 8

Arguments: ``prompt [max_tokens] [k]``. The reply is JSON: ``{"tokens", "text",
"passes", "passes_per_token"}``.
"""

import json

import inferlet


class JacobiGuess:
    """The draft of each pass: the model's predictions of the pass before, past the
    tokens it fixed (padded with the last of them at the start)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.guess: list[int] = []
        self.accepted = 0
        self.passes = 0

    def draft(self, tokens: list[int]) -> list[int]:
        self.passes += 1
        guess = self.guess[: self.k]
        return guess + [tokens[-1]] * (self.k - len(guess))

    def feedback(self, accepted: int, proposed: int) -> None:
        self.accepted = accepted

    def observe(self, preds: list[int]) -> None:
        # preds[1 + i] follows draft node i. The pass fixed nodes [0, m) and, in node m's
        # place, preds[m]; preds[m + 1:] were predicted after the wrong node m and the
        # nodes after it: the next guess, as Jacobi iteration takes it.
        self.guess = preds[self.accepted + 1 :]


async def main(args: list[str]) -> str | None:
    prompt = args[0] if args else "Once upon a time"
    max_tokens = int(args[1]) if len(args) > 1 else 64
    k = int(args[2]) if len(args) > 2 else 8
    if not 1 <= k <= 64:
        raise ValueError("k must be in [1, 64]")
    model = inferlet.get_model()
    ctx = model.create_context()
    ctx.fill(prompt)
    guess = JacobiGuess(k)
    out = await ctx.generate_speculative(guess, max_tokens)
    ctx.release()
    return json.dumps({
        "tokens": out, "text": model.tokenizer.decode(out), "passes": guess.passes,
        "passes_per_token": guess.passes / max(1, len(out)),
    })  # fmt: skip
