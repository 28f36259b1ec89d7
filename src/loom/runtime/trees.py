"""The instance caps a launch meets: ``--max-instances`` for every inferlet instance of
the server, ``--max-tree-instances`` for a client's launch and all launched from it (its
``InstanceTree``; the pages side is held in ``EagerCommands.allocate_pages``)."""

from __future__ import annotations

from loom.config import RuntimeConfig
from loom.runtime.resources import InstanceTree


def too_many(cap: int) -> str:
    return f"too many instances (the cap is {cap}: --max-instances)"


def refuse_child(config: RuntimeConfig, live_guests: int, tree: InstanceTree | None) -> str:
    """Why a child may not start now ('' when it may)."""
    if live_guests >= config.max_instances:
        return too_many(config.max_instances)
    if tree is not None and tree.live >= config.max_tree_instances:
        return (f"too many instances launched from one client's launch (the cap is "
                f"{config.max_tree_instances}: --max-tree-instances)")  # fmt: skip
    return ""
