"""Hierarchical attention: a nested document written in one pass under a 2-D attention
mask. Each section sees its ancestors and itself, never a sibling section (nor what is
nested in one), so sections are read independently, as if each were alone under its
headings; a question after the document sees all of it.

    loom run inferlets/hierarchical_attention -- '{"text": "Notes.", "children": [...]}'

The argument is JSON: a section ``{"text": str, "children": [section, ...]}``, or
``{"doc": section, "question": str, "max_tokens": int, "k": int}``. The reply is JSON:
``{"sections": [{"path": [i, ...], "tokens": n, "next": [[id, p], ...]}, ...],
"answer": str}``: each section's next-token distribution after its last token (top
``k``), in document order, and the greedy answer to the question.
"""

import json

import inferlet


def _flatten(node: dict, path: list[int], tok, out: list) -> None:
    """Sections in document order as (path, token ids); paths give the nesting."""
    ids = tok.encode(node.get("text", ""))
    if not ids:
        raise ValueError(f"section {path} has no text")
    out.append((path, ids))
    for i, child in enumerate(node.get("children", [])):
        _flatten(child, [*path, i], tok, out)


async def main(args: list[str]) -> str | None:
    cfg = json.loads(args[0]) if args else {"text": "Notes.", "children": []}
    doc = cfg.get("doc", cfg)
    question = cfg.get("question", "\nQuestion: what is this about?\nAnswer:")
    max_tokens, k = int(cfg.get("max_tokens", 8)), int(cfg.get("k", 8))
    model = inferlet.get_model()
    sections: list = []
    _flatten(doc, [], model.tokenizer, sections)
    # A token hides every earlier section that is not one of its ancestors (a path
    # prefix of its own): siblings, and everything nested in them.
    tokens: list[int] = []
    hidden: list[set[int]] = []
    spans: list[tuple[list[int], range]] = []
    for path, ids in sections:
        hide: set[int] = set()
        for other, span in spans:
            if path[: len(other)] != other:
                hide.update(span)
        start = len(tokens)
        tokens += ids
        hidden += [hide] * len(ids)
        spans.append((path, range(start, start + len(ids))))
    ctx = model.create_context()
    last = [span[-1] for _, span in spans]
    dists = await ctx.write_masked(tokens, hidden, distributions=last, k=k)
    ctx.fill(question)
    answer = await ctx.generate(max_tokens, stop=inferlet.IgnoreEos())
    ctx.release()
    out = [
        {"path": path, "tokens": len(span), "next": [[t, p] for t, p in dists[span[-1]]]}
        for path, span in spans
    ]
    return json.dumps({"sections": out, "answer": answer})
