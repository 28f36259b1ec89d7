"""A client's launch and every instance launched from it form a tree with caps of its own
(``--max-tree-instances``, ``--max-tree-page-share``): a fork bomb fills its tree, not
the server, and OpenAI completions are not counted against ``--max-instances`` at all."""

from __future__ import annotations

from typing import Any

from tests.reliability.support import complete, wait_for


def _tree_of(rrt: Any, instance_id: str) -> tuple[int, int]:
    """(live instances, KV pages held) of ``instance_id``'s tree."""

    def read() -> tuple[int, int]:
        tree = rrt.instances[instance_id].tree
        return tree.live, tree.pages

    return rrt.query(read)  # type: ignore[no-any-return]


def test_a_fork_bomb_fills_its_tree_and_the_server_still_serves(rrt: Any, testkit: str) -> None:
    wait_for(lambda: rrt.query(lambda: len(rrt.instances)) == 0)
    saved = rrt.reconfigure(max_tree_instances=4, max_instances=5)
    try:
        bomb = rrt.launch(testkit, ["bomb", testkit, "1"])
        count, _, why = bomb.recv(30).partition(" ")
        assert count == "3" and "--max-tree-instances" in why  # the root and 3 children
        wait_for(lambda: _tree_of(rrt, bomb.id) == (4, 3))
        other = rrt.launch(testkit, ["hello"])  # another client's launch: the fifth
        assert other.recv(30).startswith("hello from") and other.wait(30).ok
        # The guest cap full (a sixth launch is refused), completions are not held to it.
        filler = rrt.launch(testkit, ["hold", "1"])
        assert filler.recv(30) == "holding"
        refused = rrt.launch(testkit, ["hello"]).wait(30)
        assert not refused.ok and "--max-instances" in (refused.error or "")
        done, box = complete(rrt, 8)
        assert done.wait(60) and box[0].error is None and len(box[0].tokens) == 8
        filler.send("release")
        bomb.send("bye")
        assert bomb.wait(30).ok
        wait_for(lambda: rrt.query(lambda: len(rrt.instances)) == 0)  # its children went too
    finally:
        rrt.reconfigure(saved)


def test_a_tree_holds_at_most_its_share_of_the_pool(rrt: Any, testkit: str) -> None:
    wait_for(lambda: rrt.query(lambda: len(rrt.instances)) == 0)
    pool = rrt.query(lambda: rrt.pool.num_pages)
    cap = pool // 4
    saved = rrt.reconfigure(max_tree_page_share=0.25, max_tree_instances=6)
    try:
        # One instance over the share: ended with the reason.
        end = rrt.launch(testkit, ["hold", str(cap + 1)]).wait(30)
        assert not end.ok and "--max-tree-page-share" in (end.error or "")
        # Five children of cap/3 pages each: the tree stays within its share, the ones
        # that would take it over are ended, and the rest of the pool stays free.
        each = cap // 3
        bomb = rrt.launch(testkit, ["bomb", testkit, str(each)])
        assert bomb.recv(30).startswith("5 ")
        wait_for(lambda: _tree_of(rrt, bomb.id)[0] == 4)  # two children ended
        assert _tree_of(rrt, bomb.id) == (4, 3 * each) and 3 * each <= cap
        hoarder = rrt.launch(testkit, ["hold", str(each)])  # another tree: not held back
        assert hoarder.recv(30) == "holding"
        hoarder.send("release")
        bomb.send("bye")
        assert hoarder.wait(30).ok and bomb.wait(30).ok
    finally:
        rrt.reconfigure(saved)
