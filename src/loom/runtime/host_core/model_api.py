"""``loom`` model and tokenizer: ``model``, ``encode``, ``decode``, ``eos``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from loom.runtime.host_core.handles import MODULE, Model, check_model
from loom.runtime.wasm.ffi import CoreLinker, CoreMemory, HostCallError

if TYPE_CHECKING:
    from loom.runtime.services import RuntimeServices


def register(linker: CoreLinker, rt: RuntimeServices) -> None:
    def model(key: int, mem: CoreMemory) -> int:
        return rt.handles.add(rt.caller(key).seq, Model())

    def encode(key: int, mem: CoreMemory, m: int, text: int, n: int, out: int, cap: int) -> int:
        check_model(rt, key, m)
        ids = rt.tokenizer.encode(mem.read(text, n).decode("utf-8", errors="replace"),
                                  add_special_tokens=False)  # fmt: skip
        mem.write_u32s(out, ids[: max(0, cap)])
        return len(ids)

    def decode(key: int, mem: CoreMemory, m: int, toks: int, n: int, out: int, cap: int) -> int:
        check_model(rt, key, m)
        ids = mem.read_u32s(toks, n)
        if any(t >= rt.vocab_size for t in ids):
            raise HostCallError(f"loom_decode: token id out of range [0, {rt.vocab_size})")
        data = rt.tokenizer.decode(ids).encode()
        mem.write(out, data[: max(0, cap)])
        return len(data)

    def eos(key: int, mem: CoreMemory, m: int) -> int:
        check_model(rt, key, m)
        return rt.eos_token_ids[0] if rt.eos_token_ids else -1

    linker.add_func(MODULE, "model", "", "i", model)
    linker.add_func(MODULE, "encode", "iiiii", "i", encode)
    linker.add_func(MODULE, "decode", "iiiii", "i", decode)
    linker.add_func(MODULE, "eos", "i", "i", eos)
