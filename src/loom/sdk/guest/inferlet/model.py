"""Models and their tokenizers, as an inferlet sees them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from inferlet import _kv
from inferlet._wit import Err, kv, wit_model

if TYPE_CHECKING:
    from inferlet.context import Context


class Tokenizer:
    def __init__(self, model: wit_model.Model, vocab_size: int) -> None:
        self._model = model
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return list(self._model.encode(text))

    def decode(self, ids: list[int]) -> str:
        return str(self._model.decode(list(ids)))


class Model:
    """A served model: its tokenizer, chat template and contexts."""

    def __init__(self, raw: wit_model.Model) -> None:
        self._raw = raw
        info = raw.info()
        self.name: str = info.name
        self.architecture: str = info.architecture
        self.max_model_len: int = info.max_model_len
        self.eos_tokens: tuple[int, ...] = tuple(info.eos_tokens)
        self.bos_token: int | None = info.bos_token
        self.tokenizer = Tokenizer(raw, info.vocab_size)
        self.refs = _kv.PageRefs()  # pages held by this inferlet's contexts
        self._page_size: int | None = None

    def page_size(self, queue: object) -> int:
        if self._page_size is None:
            self._page_size = kv.page_size(queue)
        return self._page_size

    def chat_template(self, messages: list[Any], add_generation_prompt: bool = True) -> str:
        """Render chat messages (``{"role", "content"}`` dicts or pairs) with the model's
        template."""
        pairs = [(m["role"], m["content"]) if isinstance(m, dict) else tuple(m) for m in messages]
        try:
            return str(self._raw.apply_chat_template(pairs, add_generation_prompt))
        except Err as e:
            raise ValueError(f"chat template failed: {e.value}") from None

    def create_context(self) -> Context:
        """A new, empty context on a queue of its own."""
        from inferlet.context import Context

        return Context(self, self._raw.create_queue())


_models: dict[str | None, Model] = {}


def get_model(name: str | None = None) -> Model:
    """The server's default model, or the one named ``name``."""
    if name not in _models:
        if name is None:
            raw = wit_model.default_model()
        else:
            found = wit_model.get_model(name)
            if found is None:
                raise ValueError(f"the server does not serve a model named {name!r}")
            raw = found
        _models[name] = Model(raw)
    return _models[name]
