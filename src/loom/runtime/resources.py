"""Per-instance virtual resources mapped onto shared physical ones.

- ``HandleTable``: the host objects behind an instance's API resources (queues, futures,
  forward passes, models), keyed by the integer ``rep`` wasmtime hands back to us.
- ``InstancePages``: the instance's virtual KV page ids. A virtual id is created at once
  (so a guest can queue allocate -> forward without a round trip) and bound to a physical
  page when its allocate command reaches the head of its queue.
- ``InstanceTree``: an instance a client launched and every instance launched from it:
  one cap on how many of them live at once and one on the KV pages they hold together.
- ``ExportRegistry``: pages published under a name, by reference: an export holds its own
  reference on every page, so it survives the exporter freeing them; a persistent export
  also survives the exporter ending.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from loom.engine.page_pool import PagePool
from loom.runtime.futures import Take
from loom.runtime.wasm.ffi import HostCallError


class HandleTable:
    """rep -> (owning instance id, object). Reps are unique across the runtime."""

    def __init__(self) -> None:
        self._objects: dict[int, tuple[int, Any]] = {}
        self._reps = itertools.count(1)

    def add(self, owner: int, obj: Any) -> int:
        rep = next(self._reps)
        self._objects[rep] = (owner, obj)
        return rep

    def get(self, owner: int, rep: int, kind: type | tuple[type, ...]) -> Any:
        entry = self._objects.get(rep)
        if entry is None or entry[0] != owner or not isinstance(entry[1], kind):
            raise HostCallError(f"invalid handle {rep}")
        return entry[1]

    def drop(self, rep: int) -> None:
        entry = self._objects.pop(rep, None)
        if entry is not None and isinstance(entry[1], Take):
            entry[1].withdraw()  # a message for it goes to the next reader instead

    def drop_owner(self, owner: int) -> None:
        """An instance ended: its objects go, its pending takes are withdrawn."""
        for rep in [r for r, (o, _) in self._objects.items() if o == owner]:
            _, obj = self._objects.pop(rep)
            if isinstance(obj, Take):
                obj.withdraw()

    def __len__(self) -> int:
        return len(self._objects)


UNBOUND = -1


@dataclass(slots=True)
class InstanceTree:
    """A client's instance and every instance launched from it or from its descendants
    (detached ones too): a fork bomb or a launch flood fills its own tree's caps, not the
    server's. ``pages``: physical pages bound in all their ``InstancePages``."""

    live: int = 0
    pages: int = 0


class InstancePages:
    """Virtual page ids of one instance; each bound physical page holds one reference.
    Bound pages are counted on the instance's ``tree`` as well."""

    def __init__(self, pool: PagePool, tree: InstanceTree | None = None) -> None:
        self.pool = pool
        self.tree = tree if tree is not None else InstanceTree()
        self.table: dict[int, int] = {}  # virtual -> physical (UNBOUND until allocated)
        self._next = 0

    def reserve(self, n: int) -> list[int]:
        ids = list(range(self._next, self._next + n))
        self._next += n
        for v in ids:
            self.table[v] = UNBOUND
        return ids

    def bind(self, virtual: list[int], physical: list[int]) -> None:
        tree = self.tree
        for v, p in zip(virtual, physical, strict=True):
            if v in self.table:
                if self.table[v] == UNBOUND:
                    tree.pages += 1
                self.table[v] = p
            else:  # freed before its allocation ran: give the page straight back
                self.pool.free([p])

    def adopt(self, physical: list[int]) -> list[int]:
        """New virtual ids for pages already referenced on this instance's behalf."""
        ids = self.reserve(len(physical))
        self.bind(ids, physical)
        return ids

    def check(self, virtual: list[int]) -> None:
        for v in virtual:
            if v not in self.table:
                raise HostCallError(f"KV page id {v} is not held by this inferlet")

    def physical(self, virtual: list[int]) -> list[int]:
        out = []
        for v in virtual:
            p = self.table.get(v)
            if p is None:
                raise HostCallError(f"KV page id {v} is not held by this inferlet")
            if p == UNBOUND:
                raise HostCallError(
                    f"KV page id {v} is not allocated yet (allocate it on the same queue, "
                    "or synchronize first)"
                )
            out.append(p)
        return out

    def release(self, virtual: list[int]) -> None:
        for v in virtual:
            p = self.table.pop(v, None)
            if p is not None and p != UNBOUND:
                self.tree.pages -= 1
                self.pool.free([p])

    def release_all(self) -> None:
        self.release(list(self.table))

    @property
    def num_bound(self) -> int:
        return sum(1 for p in self.table.values() if p != UNBOUND)


@dataclass
class Export:
    pages: list[int]  # physical, one reference each held by the export
    owner: int
    persistent: bool
    program: str = ""  # the exporter's program: it may unexport a persistent export
    public: bool = False  # importable by any program (else by the exporter's program only)


class ExportRegistry:
    def __init__(self, pool: PagePool) -> None:
        self.pool = pool
        self.exports: dict[str, Export] = {}

    def add(
        self, name: str, pages: list[int], owner: int, persistent: bool, program: str = ""
    ) -> None:
        if name in self.exports:
            raise HostCallError(f"an export named {name!r} already exists")
        self.pool.incref(pages)
        self.exports[name] = Export(list(pages), owner, persistent, program)

    def persistent_pages(self, program: str) -> int:
        """KV pages the persistent exports of ``program`` hold (its quota's use)."""
        return sum(len(e.pages) for e in self.exports.values()
                   if e.persistent and e.program == program)  # fmt: skip

    def may_remove(self, name: str, owner: int, program: str) -> bool:
        """Only the exporter removes an export; a persistent one (its exporter may have
        ended), any instance of the exporter's program. No such export: nothing to guard."""
        exp = self.exports.get(name)
        return exp is None or exp.owner == owner or (exp.persistent and exp.program == program)

    def visible(self, name: str, program: str) -> bool:
        """Whether instances of ``program`` may see and import the export ``name``: those
        of the exporter's program, and anyone once its owner made it public."""
        exp = self.exports.get(name)
        return exp is not None and (exp.public or exp.program == program)

    def take(self, name: str, program: str) -> list[int] | None:
        """References to the exported pages for an importer of ``program`` (None: no
        such export, or one it may not import: the two look the same to the importer)."""
        if not self.visible(name, program):
            return None
        exp = self.exports[name]
        self.pool.incref(exp.pages)
        return list(exp.pages)

    def publish(self, name: str) -> bool:
        """Let any program import ``name``; False when there is no such export."""
        exp = self.exports.get(name)
        if exp is None:
            return False
        exp.public = True
        return True

    def remove(self, name: str) -> bool:
        exp = self.exports.pop(name, None)
        if exp is None:
            return False
        self.pool.free(exp.pages)
        return True

    def drop_owner(self, owner: int) -> None:
        """Remove the non-persistent exports of an instance that ended."""
        for name in [n for n, e in self.exports.items() if e.owner == owner and not e.persistent]:
            self.remove(name)

    def listing(self, program: str) -> list[tuple[str, int]]:
        """The exports instances of ``program`` may import, with their page counts."""
        return [(n, len(e.pages)) for n, e in sorted(self.exports.items())
                if e.public or e.program == program]  # fmt: skip
