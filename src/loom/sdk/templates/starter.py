"""NAME: a Loom inferlet. Build it with `loom build NAME/app.py`."""

import inferlet


async def main(args: list[str]) -> str | None:
    prompt = args[0] if args else "Once upon a time"
    model = inferlet.get_model()
    ctx = model.create_context()
    ctx.fill(prompt)
    # Token by token: each step is one forward pass, batched with every other inferlet's.
    pieces = []
    async for piece in ctx.generate_stream(max_tokens=32, sampler=inferlet.TopP(0.9, t=0.7)):
        inferlet.send(piece)  # stream to the client as it comes
        pieces.append(piece)
    ctx.release()
    return prompt + "".join(pieces)
