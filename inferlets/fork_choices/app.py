"""Four continuations of one prompt, generated together (the README's example).

loom build inferlets/fork_choices
"""

import inferlet


async def main(args: list[str]) -> str | None:
    ctx = inferlet.get_model().create_context()
    ctx.fill(args[0])
    ctx.flush()  # write the prompt's KV once
    forks = [ctx.fork() for _ in range(4)]  # ...and share its full pages
    for i, f in enumerate(forks):
        f.fill(f" Option {i}:")
    # One decode step of every fork, submitted together: one engine batch per step.
    outs = await inferlet.gather(*(
        f.generate(max_tokens=16, sampler=inferlet.TopP(0.9, seed=i)) for i, f in enumerate(forks)
    ))  # fmt: skip
    for f in forks:
        f.release()
    ctx.release()
    return "\n".join(outs)
