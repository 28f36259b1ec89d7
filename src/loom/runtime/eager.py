"""Eager commands and the out-of-pages policy.

Commands other than forward passes (allocate, free, copy, mask, export, sync) run as soon
as they reach the head of their queue; one that cannot run yet (pages short, a sync
behind a pass in flight) blocks its queue, and is looked at again next turn. When the
pool runs short, ``allocate_pages`` applies the configured policy: ``wait`` (the default;
killed after ``page_wait_timeout_s``) or ``kill-newest`` (the youngest instance holding
pages gives them up for an older one).
"""

from __future__ import annotations

import time
from typing import Any

from loom.engine.worker import SetLiveOp
from loom.runtime import context_cache
from loom.runtime.batcher import Batcher
from loom.runtime.commands import (
    AllocateCmd,
    CommandQueue,
    CopyCmd,
    ExportCmd,
    ForwardCmd,
    FreeCmd,
    GenerateCmd,
    MaskCmd,
    PublishCmd,
    SyncCmd,
    UnexportCmd,
)
from loom.runtime.guests import Guests
from loom.runtime.instance import Instance
from loom.runtime.services import RuntimeServices
from loom.runtime.wasm.ffi import HostCallError


class EagerCommands:
    """Runs the eager commands at the heads of every queue."""

    def __init__(self, rt: RuntimeServices, batcher: Batcher, guests: Guests) -> None:
        self.rt = rt
        self.batcher = batcher
        self.guests = guests

    def advance(self) -> None:
        """Run eager commands at every queue's head until each queue is empty, blocked, or
        has forward work at its head (left to the batcher)."""
        # Every turn looks at every queue (twice): a decode loop's queue holds a forward
        # command or nothing, seen here without a method call per queue.
        by_seq = self.guests.by_seq
        for q in self.batcher.queues:
            while True:
                cmds, head = q.cmds, q.head
                if head >= len(cmds):
                    break
                cmd = cmds[head]
                if isinstance(cmd, (ForwardCmd, GenerateCmd)):
                    break
                inst = by_seq.get(q.owner)
                if inst is None or not self.run(inst, q, cmd):
                    break
                q.pop()

    def run(self, inst: Instance, q: CommandQueue, cmd: Any) -> bool:
        """Run one eager command; False when it must wait (the queue stays blocked)."""
        rt = self.rt
        try:
            if isinstance(cmd, AllocateCmd):
                pages = self.allocate_pages(inst, len(cmd.virtual), cmd)
                if pages is None:
                    return False
                inst.pages.bind(cmd.virtual, pages)
            elif isinstance(cmd, FreeCmd):
                inst.pages.release(cmd.virtual)
            elif isinstance(cmd, CopyCmd):
                (src,) = inst.pages.physical([cmd.src])
                dst = context_cache.own_page(rt, inst, cmd.dst)  # copy-on-write
                if dst is None:
                    return False
                context_cache.fresh_copy(rt, src, dst, cmd.src_offset, cmd.dst_offset, cmd.size)
            elif isinstance(cmd, MaskCmd):
                page = context_cache.own_page(rt, inst, cmd.page)  # copy-on-write
                if page is None:
                    return False
                rt.track_op(SetLiveOp(page, cmd.keep))
            elif isinstance(cmd, ExportCmd):
                pages = inst.pages.physical(cmd.virtual)
                if cmd.persistent:
                    self._check_quota(inst, len(pages))
                rt.exports.add(cmd.name, pages, inst.seq, cmd.persistent, inst.program)
            elif isinstance(cmd, UnexportCmd):
                if not rt.exports.may_remove(cmd.name, inst.seq, inst.program):
                    raise HostCallError(f"unexport: {cmd.name!r} belongs to another inferlet")
                rt.exports.remove(cmd.name)
            elif isinstance(cmd, PublishCmd):
                if not rt.exports.may_remove(cmd.name, inst.seq, inst.program):
                    raise HostCallError(f"publish: {cmd.name!r} belongs to another inferlet")
                if not rt.exports.publish(cmd.name):
                    raise HostCallError(f"publish: no export named {cmd.name!r}")
            elif isinstance(cmd, SyncCmd):
                if q.inflight:
                    return False
                cmd.future.resolve(not q.failed)
        except HostCallError as e:
            self.guests.kill(inst, str(e))
            return False
        return True

    def _check_quota(self, inst: Instance, n: int) -> None:
        """Persistent exports outlive their exporter: a program's may hold at most
        ``max_export_share`` of the pool, so that one cannot hoard it for good."""
        pool, share = self.rt.pool, self.rt.config.max_export_share
        held = self.rt.exports.persistent_pages(inst.program)
        if held + n > share * pool.num_pages:
            raise HostCallError(f"export: this program's persistent exports would hold "
                                f"{held + n} of {pool.num_pages} KV pages (at most {share:g} "
                                f"of them)")  # fmt: skip

    def allocate_pages(
        self, inst: Instance, n: int, cmd: AllocateCmd | GenerateCmd | None = None
    ) -> list[int] | None:
        """Physical pages for ``inst``, or None to wait (the out-of-pages policy). ``cmd``:
        the command that waits, which the wait timeout ends (without one, no timeout)."""
        pool, config, guests = self.rt.pool, self.rt.config, self.guests
        tree = inst.tree
        if tree is not None and tree.pages + n > config.max_tree_page_share * pool.num_pages:
            guests.kill(inst, f"out of KV pages: this inferlet and those launched with it "
                              f"would hold {tree.pages + n} of {pool.num_pages} (at most "
                              f"{config.max_tree_page_share:g} of them: "
                              f"--max-tree-page-share)")  # fmt: skip
            return None
        if pool.can_allocate(n):
            if cmd is not None:
                cmd.since = 0.0
            return pool.allocate(n)
        if n > pool.num_pages:
            guests.kill(inst, f"asked for {n} KV pages; the pool has {pool.num_pages}")
            return None
        if config.out_of_pages == "kill-newest":
            victims = [i for i in guests.instances.values() if i.alive and i.kill_reason is None
                       and i.seq > inst.seq and i.pages.num_bound]  # fmt: skip
            if victims:
                victim = max(victims, key=lambda i: i.seq)
                guests.kill(victim, "terminated to free KV pages for an older inferlet")
            else:
                guests.kill(inst, "out of KV pages")
            return None
        now = time.perf_counter()
        if cmd is not None:
            if not cmd.since:
                cmd.since = now
            elif now - cmd.since > config.page_wait_timeout_s:
                limit = config.page_wait_timeout_s
                guests.kill(inst, f"out of KV pages: waited {limit:g} s for {n} pages")
        return None
