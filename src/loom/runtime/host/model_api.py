"""``model``: model metadata, the host tokenizer and chat template, queue creation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loom.runtime.host.common import iface
from loom.runtime.wasm.ffi import (
    BOOL,
    STRING,
    U8,
    U32,
    ComponentLinker,
    Err,
    HostCallError,
    Ok,
    borrow,
    list_of,
    option,
    own,
    record,
    result,
    tuple_of,
)

if TYPE_CHECKING:
    from loom.runtime.services import RuntimeServices

NAME = iface("model")
MODEL_INFO = record(
    ("name", STRING),
    ("architecture", STRING),
    ("vocab-size", U32),
    ("num-layers", U32),
    ("hidden-size", U32),
    ("max-model-len", U32),
    ("kv-page-size", U32),
    ("eos-tokens", list_of(U32)),
    ("bos-token", option(U32)),
)


class ModelHandle:
    """The host object behind a guest's ``model`` resource (one model per runtime)."""


def register(linker: ComponentLinker, rt: RuntimeServices) -> None:
    linker.add_resource(NAME, "model", lambda key, rep: rt.handles.drop(rep))
    vocab_cache: list[list[bytes]] = []

    def model(key: int, rep: int) -> None:
        rt.handles.get(rt.caller(key).seq, rep, ModelHandle)

    def info(key: int, rep: int) -> tuple[Any, ...]:
        model(key, rep)
        cfg, tok = rt.model_config, rt.tokenizer
        return (
            rt.model_name,
            cfg.architecture,
            rt.vocab_size,
            cfg.num_layers,
            cfg.hidden_size,
            rt.max_model_len,
            rt.page_size,
            list(rt.eos_token_ids),
            tok.bos_token_id,
        )

    def encode(key: int, rep: int, text: str) -> list[int]:
        model(key, rep)
        return rt.tokenizer.encode(text, add_special_tokens=False)

    def decode(key: int, rep: int, tokens: list[int]) -> str:
        model(key, rep)
        if any(not 0 <= t < rt.vocab_size for t in tokens):
            raise HostCallError(f"token id out of range [0, {rt.vocab_size})")
        return rt.tokenizer.decode(tokens, skip_special_tokens=False)

    def vocab(key: int, rep: int) -> list[bytes]:
        model(key, rep)
        if not vocab_cache:
            tok = rt.tokenizer
            vocab_cache.append(
                [tok.decode([i], skip_special_tokens=False).encode() for i in range(rt.vocab_size)]
            )
        return vocab_cache[0]

    def chat_template(key: int, rep: int) -> str:
        model(key, rep)
        return rt.tokenizer.chat_template or ""

    def apply_chat_template(
        key: int, rep: int, messages: list[tuple[str, str]], add_generation_prompt: bool
    ) -> Ok | Err:
        model(key, rep)
        try:
            text = rt.tokenizer.apply_chat_template(
                [{"role": r, "content": c} for r, c in messages],
                add_generation_prompt=add_generation_prompt,
            )
        except Exception as e:
            return Err(f"chat template failed: {e}")
        return Ok(text)

    def create_queue(key: int, rep: int) -> int:
        inst = rt.caller(key)
        model(key, rep)
        return rt.handles.add(inst.seq, rt.new_queue(inst))

    def get_model(key: int, name: str) -> int | None:
        inst = rt.caller(key)
        if name != rt.model_name:
            return None
        return rt.handles.add(inst.seq, ModelHandle())

    def default_model(key: int) -> int:
        return rt.handles.add(rt.caller(key).seq, ModelHandle())

    m = borrow("model")
    linker.add_func(NAME, "[method]model.info", [m], MODEL_INFO, info)
    linker.add_func(NAME, "[method]model.encode", [m, STRING], list_of(U32), encode)
    linker.add_func(NAME, "[method]model.decode", [m, list_of(U32)], STRING, decode)
    linker.add_func(NAME, "[method]model.vocab", [m], list_of(list_of(U8)), vocab)
    linker.add_func(NAME, "[method]model.chat-template", [m], STRING, chat_template)
    linker.add_func(
        NAME,
        "[method]model.apply-chat-template",
        [m, list_of(tuple_of(STRING, STRING)), BOOL],
        result(STRING, STRING),
        apply_chat_template,
    )
    linker.add_func(NAME, "[method]model.create-queue", [m], own("queue"), create_queue)
    linker.add_func(NAME, "get-model", [STRING], option(own("model")), get_model)
    linker.add_func(NAME, "default-model", [], own("model"), default_model)
