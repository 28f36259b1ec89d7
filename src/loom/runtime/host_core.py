"""The C ABI for native (C/Zig) inferlets: import module ``loom``, numbers and offsets.

Native inferlets are plain core modules (no component toolchain installs here): they
export ``memory`` and ``int32_t run(void)`` (0: success) and import the functions below.
Buffers are (offset, length) pairs in the guest's memory, checked against its bounds.
Handles (models, queues, futures) are small integers owned by the instance. The
declarations are in ``loom/sdk/c/loom.h``; the semantics follow the WIT API.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from loom.engine.batch import OutputSpec
from loom.runtime.commands import AllocateCmd, CommandQueue, FreeCmd
from loom.runtime.futures import HostFuture
from loom.runtime.host.common import sampler_spec
from loom.runtime.host.forward_api import (
    ForwardPassBuilder,
    PassWait,
    Settled,
    chain_pass,
    settle_ahead,
    submit_pass,
)
from loom.runtime.wasm.ffi import CoreLinker, CoreMemory, Err, HostCallError, Ok

if TYPE_CHECKING:
    from loom.runtime.services import RuntimeServices

MODULE = "loom"
MAX_TOKENS_PER_CALL = 1 << 16


class _Model:
    """The model handle a native inferlet holds."""


class _Result:
    """A finished forward pass's outputs, kept for ``loom_dist``."""

    def __init__(self, fut: HostFuture, specs: list[OutputSpec]) -> None:
        self.fut = fut
        self.specs = specs


def register_core(linker: CoreLinker, rt: RuntimeServices) -> None:
    def inst_of(key: int) -> Any:
        return rt.caller(key)

    def queue_of(key: int, q: int) -> tuple[Any, CommandQueue]:
        inst = inst_of(key)
        return inst, rt.handles.get(inst.seq, q, CommandQueue)

    def arg_count(key: int, mem: CoreMemory) -> int:
        return len(inst_of(key).arguments)

    def arg(key: int, mem: CoreMemory, i: int, buf: int, cap: int) -> int:
        args = inst_of(key).arguments
        if not 0 <= i < len(args):
            raise HostCallError(f"loom_arg: no argument {i} (there are {len(args)})")
        data = args[i].encode()
        mem.write(buf, data[: max(0, cap)])
        return len(data)

    def send(key: int, mem: CoreMemory, ptr: int, n: int) -> None:
        text = mem.read(ptr, n).decode("utf-8", errors="replace")
        rt.messaging.send_to_client(inst_of(key), text)

    def fail(key: int, mem: CoreMemory, ptr: int, n: int) -> None:
        inst_of(key).native_error = mem.read(ptr, n).decode("utf-8", errors="replace")

    def model(key: int, mem: CoreMemory) -> int:
        return rt.handles.add(inst_of(key).seq, _Model())

    def check_model(key: int, m: int) -> Any:
        inst = inst_of(key)
        rt.handles.get(inst.seq, m, _Model)
        return inst

    def encode(key: int, mem: CoreMemory, m: int, text: int, n: int, out: int, cap: int) -> int:
        check_model(key, m)
        ids = rt.tokenizer.encode(mem.read(text, n).decode("utf-8", errors="replace"),
                                  add_special_tokens=False)  # fmt: skip
        mem.write_u32s(out, ids[: max(0, cap)])
        return len(ids)

    def decode(key: int, mem: CoreMemory, m: int, toks: int, n: int, out: int, cap: int) -> int:
        check_model(key, m)
        ids = mem.read_u32s(toks, n)
        if any(t >= rt.vocab_size for t in ids):
            raise HostCallError(f"loom_decode: token id out of range [0, {rt.vocab_size})")
        data = rt.tokenizer.decode(ids).encode()
        mem.write(out, data[: max(0, cap)])
        return len(data)

    def eos(key: int, mem: CoreMemory, m: int) -> int:
        check_model(key, m)
        return rt.eos_token_ids[0] if rt.eos_token_ids else -1

    def queue(key: int, mem: CoreMemory, m: int) -> int:
        inst = check_model(key, m)
        return rt.handles.add(inst.seq, rt.new_queue(inst))

    def page_size(key: int, mem: CoreMemory, q: int) -> int:
        queue_of(key, q)
        return rt.page_size

    def allocate(key: int, mem: CoreMemory, q: int, n: int, out: int) -> int:
        inst, queue = queue_of(key, q)
        if not 0 < n <= MAX_TOKENS_PER_CALL:
            raise HostCallError(f"loom_allocate: n must be in [1, {MAX_TOKENS_PER_CALL}]")
        mem.write(out, bytes(4 * n))  # bounds first: nothing is reserved for a bad buffer
        ids = inst.pages.reserve(n)
        rt.enqueue(queue, AllocateCmd(ids))
        mem.write_u32s(out, ids)
        return n

    def free(key: int, mem: CoreMemory, q: int, pages: int, n: int) -> None:
        inst, queue = queue_of(key, q)
        ids = mem.read_u32s(pages, n)
        inst.pages.check(ids)
        rt.enqueue(queue, FreeCmd(ids))

    def build(key: int, mem: CoreMemory, q: int, toks: int, n: int, pos0: int, pages: int,
              npages: int, last: int) -> tuple[Any, ForwardPassBuilder]:  # fmt: skip
        inst, queue = queue_of(key, q)
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
        return rt.handles.add(inst.seq, _Result(submit_pass(rt, fp, specs), specs))

    def forward_dist(key: int, mem: CoreMemory, q: int, toks: int, n: int, pos0: int,
                     pages: int, npages: int, last: int, k: int) -> int:  # fmt: skip
        inst, fp = build(key, mem, q, toks, n, pos0, pages, npages, last)
        if not 0 < k <= rt.vocab_size:
            raise HostCallError(f"loom_forward_dist: k must be in [1, {rt.vocab_size}]")
        specs = [OutputSpec(n - 1, None, k)]
        return rt.handles.add(inst.seq, _Result(submit_pass(rt, fp, specs), specs))

    def result_of(key: int, f: int) -> _Result:
        inst = inst_of(key)
        res: _Result = rt.handles.get(inst.seq, f, _Result)
        return res

    class _Waiter:
        """``loom_wait``'s pending value: the sampled token once the pass is done (the
        instance sleeps on its fiber meanwhile)."""

        def __init__(self, res: _Result, inst: Any) -> None:
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

    def wait(key: int, mem: CoreMemory, f: int) -> Any:
        waiter = _Waiter(result_of(key, f), inst_of(key))
        return waiter if not waiter.ready() else waiter.value()

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

    def step_chain(
        key: int, mem: CoreMemory, q: int, toks: int, n: int, pos0: int, pages: int,
        npages: int, last: int, next_npages: int, next_last: int, temperature: float,
        top_k: int, top_p: float,
    ) -> Any:  # fmt: skip
        inst, queue = queue_of(key, q)
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
        inst, queue = queue_of(key, q)
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

    def drop(key: int, mem: CoreMemory, h: int) -> None:
        inst = inst_of(key)
        rt.handles.get(inst.seq, h, (_Result, _Model))
        rt.handles.drop(h)

    table: list[tuple[str, str, str, Callable[..., Any]]] = [
        ("arg_count", "", "i", arg_count),
        ("arg", "iii", "i", arg),
        ("send", "ii", "", send),
        ("fail", "ii", "", fail),
        ("model", "", "i", model),
        ("encode", "iiiii", "i", encode),
        ("decode", "iiiii", "i", decode),
        ("eos", "i", "i", eos),
        ("queue", "i", "i", queue),
        ("page_size", "i", "i", page_size),
        ("allocate", "iii", "i", allocate),
        ("free", "iii", "", free),
        ("forward", "iiiiiiifif", "i", forward),
        ("forward_dist", "iiiiiiii", "i", forward_dist),
        ("wait", "i", "i", wait),
        ("step_chain", "iiiiiiiiifif", "i", step_chain),
        ("step_settle", "i", "i", step_settle),
        ("dist", "iiii", "i", dist),
        ("drop", "i", "", drop),
    ]
    for name, params, result, fn in table:
        linker.add_func(MODULE, name, params, result, fn)
