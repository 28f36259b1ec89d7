"""``loom`` forward passes: ``forward`` / ``forward_dist``, ``wait`` (which suspends the
guest on its fiber), ``dist``, and ``step_chain`` / ``step_settle`` for pipelined decode
steps, over the same runtime objects and step-chain code as the WIT ``forward`` API."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loom.engine.batch import OutputSpec
from loom.runtime.host.common import sampler_spec
from loom.runtime.host.forward_api import (
    ForwardPassBuilder,
    PassWait,
    Settled,
    chain_pass,
    settle_ahead,
    submit_pass,
)
from loom.runtime.host_core.handles import MAX_TOKENS_PER_CALL, MODULE, PassResult, queue_of
from loom.runtime.wasm.ffi import CoreLinker, CoreMemory, Err, HostCallError, Ok

if TYPE_CHECKING:
    from loom.runtime.services import RuntimeServices


class _Waiter:
    """``loom_wait``'s pending value: the sampled token once the pass is done (the
    instance sleeps on its fiber meanwhile)."""

    def __init__(self, res: PassResult, inst: Any, rt: RuntimeServices) -> None:
        self.res, self.inst = res, inst
        if not res.fut.done:
            res.fut.waiters.append(rt.waker(inst))
            inst.blocked = self

    def ready(self) -> bool:
        return bool(self.res.fut.done)

    def value(self) -> int:
        out = self.res.fut.value
        if isinstance(out, Err):
            self.inst.native_error = str(out.value)
            return -1
        assert isinstance(out, Ok)
        tokens = out.value[0]
        return int(tokens[0]) if tokens else 0


class _Token:
    """A ``step-chain`` or ``step-settle`` wait as an ``int32_t``: the sampled token,
    -1 for none (a settled pass ahead that never ran), -2 when the pass failed."""

    def __init__(self, wait: PassWait | Settled, inst: Any) -> None:
        self.wait, self.inst = wait, inst

    def ready(self) -> bool:
        return self.wait.ready()

    def value(self) -> int:
        out = self.wait.value()
        if isinstance(out, Err):
            self.inst.native_error = str(out.value)
            return -2
        return -1 if out.value is None else int(out.value)


def register(linker: CoreLinker, rt: RuntimeServices) -> None:
    def build(key: int, mem: CoreMemory, q: int, toks: int, n: int, pos0: int, pages: int,
              npages: int, last: int) -> tuple[Any, ForwardPassBuilder]:  # fmt: skip
        inst, queue = queue_of(rt, key, q)
        if not 0 < n <= MAX_TOKENS_PER_CALL or not 0 < npages <= MAX_TOKENS_PER_CALL:
            raise HostCallError("loom_forward: bad token or page count")
        page_ids = mem.read_u32s(pages, npages)
        inst.pages.check(page_ids)
        fp = ForwardPassBuilder(queue, mem.read_u32s(toks, n), list(range(pos0, pos0 + n)),
                                page_ids, last)  # fmt: skip
        return inst, fp

    def forward(
        key: int, mem: CoreMemory, q: int, toks: int, n: int, pos0: int, pages: int,
        npages: int, last: int, temperature: float, top_k: int, top_p: float,
    ) -> int:  # fmt: skip
        inst, fp = build(key, mem, q, toks, n, pos0, pages, npages, last)
        spec = sampler_spec((temperature, top_k, top_p, 0.0, None))
        specs = [OutputSpec(n - 1, spec)]
        return rt.handles.add(inst.seq, PassResult(submit_pass(rt, fp, specs), specs))

    def forward_dist(key: int, mem: CoreMemory, q: int, toks: int, n: int, pos0: int,
                     pages: int, npages: int, last: int, k: int) -> int:  # fmt: skip
        inst, fp = build(key, mem, q, toks, n, pos0, pages, npages, last)
        if not 0 < k <= rt.vocab_size:
            raise HostCallError(f"loom_forward_dist: k must be in [1, {rt.vocab_size}]")
        specs = [OutputSpec(n - 1, None, k)]
        return rt.handles.add(inst.seq, PassResult(submit_pass(rt, fp, specs), specs))

    def result_of(key: int, f: int) -> PassResult:
        inst = rt.caller(key)
        res: PassResult = rt.handles.get(inst.seq, f, PassResult)
        return res

    def wait(key: int, mem: CoreMemory, f: int) -> Any:
        waiter = _Waiter(result_of(key, f), rt.caller(key), rt)
        return waiter if not waiter.ready() else waiter.value()

    def step_chain(
        key: int, mem: CoreMemory, q: int, toks: int, n: int, pos0: int, pages: int,
        npages: int, last: int, next_npages: int, next_last: int, temperature: float,
        top_k: int, top_p: float,
    ) -> Any:  # fmt: skip
        inst, queue = queue_of(rt, key, q)
        if not 0 <= n <= MAX_TOKENS_PER_CALL or not 0 < next_npages <= MAX_TOKENS_PER_CALL:
            raise HostCallError("loom_step_chain: bad token or page count")
        if not 0 <= npages <= next_npages:
            raise HostCallError("loom_step_chain: npages must be in [0, next_npages]")
        page_ids = mem.read_u32s(pages, next_npages)
        spec = sampler_spec((temperature, top_k, top_p, 0.0, None))
        wait = _Token(chain_pass(rt, inst, queue, mem.read_u32s(toks, n),
                                 list(range(pos0, pos0 + n)), page_ids[:npages], last, spec,
                                 page_ids, next_last), inst)  # fmt: skip
        return wait if not wait.ready() else wait.value()

    def step_settle(key: int, mem: CoreMemory, q: int) -> Any:
        inst, queue = queue_of(rt, key, q)
        wait = _Token(settle_ahead(rt, inst, queue), inst)
        return wait if not wait.ready() else wait.value()

    def dist(key: int, mem: CoreMemory, f: int, ids: int, probs: int, cap: int) -> int:
        res = result_of(key, f)
        out = res.fut.value if res.fut.done else None
        if not isinstance(out, Ok):
            raise HostCallError("loom_dist: the pass has not finished (call loom_wait first)")
        dist_ids, dist_probs = out.value[4], out.value[5]
        n = min(max(0, cap), len(dist_ids))
        mem.write_u32s(ids, dist_ids[:n])
        mem.write_f32s(probs, dist_probs[:n])
        return len(dist_ids)

    linker.add_func(MODULE, "forward", "iiiiiiifif", "i", forward)
    linker.add_func(MODULE, "forward_dist", "iiiiiiii", "i", forward_dist)
    linker.add_func(MODULE, "wait", "i", "i", wait)
    linker.add_func(MODULE, "step_chain", "iiiiiiiiifif", "i", step_chain)
    linker.add_func(MODULE, "step_settle", "i", "i", step_settle)
    linker.add_func(MODULE, "dist", "iiii", "i", dist)
