"""A prompt tree: a root prompt, two branches, two sub-branches each, two leaves each
(1x2x2x2: eight prompts) sharing the KV of what they have in common; the eight leaves
then generate together.

    loom run inferlets/prefix_tree -- "A long shared introduction ..." 16

Arguments: ``root [max_tokens] [separate]``; ``separate``: eight separate prompts, nothing
shared (the naive baseline). Each level forks the contexts of the level above (full
pages shared by reference) and fills its own segment. The reply is JSON: ``{"leaves":
[text, ...], "pages_used", "pages_separate", "root_page_holders"}``: the distinct KV pages
the eight leaves hold, the pages eight separate prompts would hold, and how many leaves
hold the root's first page.
"""

import json

import inferlet
from inferlet.sharing import branch

SEGMENTS = [
    [" Branch A: the river.", " Branch B: the mill."],
    [" Then the morning.", " Then the evening."],
    [" Short answer:", " Long answer:"],
]


async def main(args: list[str]) -> str | None:
    root = args[0] if args else "An old story told three ways. " * 8
    max_tokens = int(args[1]) if len(args) > 1 else 16
    share = not (len(args) > 2 and args[2] == "separate")
    model = inferlet.get_model()
    level = [model.create_context()]
    level[0].fill(root)
    if share:
        level[0].flush()
    root_pages = list(level[0].pages)
    for segments in SEGMENTS:
        children = []
        for parent in level:
            for seg in segments:
                child = branch(parent, share)
                child.fill(seg)
                children.append(child)
        # Every branch of the level writes its segment, in one batch, before it forks.
        if share:
            await inferlet.gather(*(c.write() for c in children))
        for parent in level:
            parent.release()
        level = children
    leaves = await inferlet.gather(*(
        leaf.generate(max_tokens=max_tokens, stop=inferlet.IgnoreEos()) for leaf in level
    ))  # fmt: skip
    ps = level[0].page_size
    used = {p for leaf in level for p in leaf.pages}
    separate = sum(-(-len(leaf.tokens) // ps) for leaf in level)
    holders = sum(1 for leaf in level if root_pages and root_pages[0] in leaf.pages)
    for leaf in level:
        leaf.release()
    return json.dumps({"leaves": leaves, "pages_used": len(used), "pages_separate": separate,
                       "root_page_holders": holders})  # fmt: skip
