"""Tokenizer: HF ``tokenizer.json`` through ``tokenizers``, chat templates through jinja2.

The behaviour mirrors ``transformers.AutoTokenizer`` (5.x) for the files a model directory
holds, so prompts tokenize to the ids the model was trained on:

* the ``tokenizer.json`` post-processor alone decides whether BOS/EOS are added. transformers
  5.x drops ``add_bos_token``/``add_eos_token`` from ``tokenizer_config.json`` whenever a
  ``tokenizer.json`` exists, so honouring them here would disagree with it;
* named special tokens (``bos_token``, ``pad_token``, ...) and ``additional_special_tokens``
  from ``tokenizer_config.json`` that ``tokenizer.json`` lacks are added as special tokens,
  in the same order, so ids, ``vocab_size`` and special-token skipping agree;
* chat templates render in the same sandboxed jinja2 environment (``chat_template.py``)
  and with the same variables, preferring ``chat_template.jinja`` over the config entry as
  transformers does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
from tokenizers import AddedToken
from tokenizers import Tokenizer as _HFTokenizer

from loom.errors import ModelLoadError
from loom.models.chat_template import compile_chat_template

# transformers' ``SPECIAL_TOKENS_ATTRIBUTES``, in its order (the order new tokens get ids).
SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


def _token_text(value: Any) -> str | None:
    """tokenizer_config stores special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        content = value.get("content")
        return content if isinstance(content, str) else None
    return value if isinstance(value, str) else None


def _added_token(value: Any) -> AddedToken | None:
    """A special ``AddedToken`` keeping the strip/word flags a dict entry may carry."""
    text = _token_text(value)
    if text is None:
        return None
    flags = value if isinstance(value, dict) else {}
    return AddedToken(
        text,
        single_word=bool(flags.get("single_word", False)),
        lstrip=bool(flags.get("lstrip", False)),
        rstrip=bool(flags.get("rstrip", False)),
        normalized=bool(flags.get("normalized", False)),
        special=True,
    )


def _read_json(path: Path) -> dict[str, Any]:
    """The parsed file, ``{}`` when absent; a file that exists but is broken is an error."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return data


def _config_chat_template(config: dict[str, Any]) -> str | None:
    """``chat_template`` is a string, or a list of named templates of which "default" is used."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class Tokenizer:
    """Encode/decode and the chat template of one model directory.

    ``tokenizer`` is modified in place: named special tokens from ``config`` that it lacks
    are added, as transformers does.
    """

    def __init__(
        self,
        tokenizer: _HFTokenizer,
        config: dict[str, Any],
        generation_config: dict[str, Any] | None = None,
        chat_template: str | None = None,
    ) -> None:
        self._tok = tokenizer
        self.config = config
        self.chat_template: str | None = chat_template or _config_chat_template(config)
        self._add_missing_special_tokens()
        # Template variables: transformers passes its ``special_tokens_map`` to templates.
        self.special_tokens: dict[str, str] = {
            key: text for key in SPECIAL_TOKEN_KEYS if (text := _token_text(config.get(key)))
        }
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        self.bos_token_id: int | None = (
            None if self.bos_token is None else tokenizer.token_to_id(self.bos_token)
        )
        eos: list[int] = []
        eos_id = None if self.eos_token is None else tokenizer.token_to_id(self.eos_token)
        if eos_id is not None:
            eos.append(eos_id)
        # generation_config may list several stop ids (Llama 3: <|end_of_text|>, <|eot_id|>).
        gen_eos = (generation_config or {}).get("eos_token_id")
        for t in gen_eos if isinstance(gen_eos, list) else [gen_eos]:
            if isinstance(t, int) and not isinstance(t, bool) and t not in eos:
                eos.append(t)
        self.eos_token_ids: tuple[int, ...] = tuple(eos)

    def _add_missing_special_tokens(self) -> None:
        present = {t.content for t in self._tok.get_added_tokens_decoder().values()}
        extra = self.config.get("additional_special_tokens")
        if extra is None:  # the transformers 5 name; a dict maps names to tokens
            extra = self.config.get("extra_special_tokens")
        if isinstance(extra, dict):
            extra = list(extra.values())
        candidates = [self.config.get(k) for k in SPECIAL_TOKEN_KEYS]
        candidates += extra if isinstance(extra, list) else []
        missing: list[AddedToken] = []
        for value in candidates:
            token = _added_token(value)
            if token is not None and token.content not in present:
                present.add(token.content)
                missing.append(token)
        if missing:
            self._tok.add_special_tokens(missing)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        """Load ``tokenizer.json`` plus the optional ``tokenizer_config.json``,
        ``generation_config.json`` and ``chat_template.jinja`` of ``model_dir``."""
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(f"{path} not found: a model directory needs tokenizer.json")
        try:
            tok = _HFTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises plain Exception
            raise ModelLoadError(f"cannot load {path}: {exc}") from exc
        config = _read_json(model_dir / "tokenizer_config.json")
        gen = _read_json(model_dir / "generation_config.json")
        template_path = model_dir / "chat_template.jinja"
        template = None
        if template_path.is_file():
            try:
                template = template_path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ModelLoadError(f"cannot read {template_path}: {exc}") from exc
        return cls(tok, config, gen, chat_template=template)

    def to_json(self) -> str:
        """The tokenizer as ``tokenizer.json`` text, added special tokens included."""
        return str(self._tok.to_str())

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows, added tokens included."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def token_to_id(self, token: str) -> int | None:
        """The id of one token string (added tokens included), None if unknown."""
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The token string of one id, None if out of range."""
        return self._tok.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` the tokenizer.json
        post-processor adds BOS/EOS where the model wants them."""
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; unknown ids are dropped, invalid UTF-8 becomes U+FFFD."""
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    @cached_property
    def _template(self) -> jinja2.Template:
        if not self.chat_template:
            raise ModelLoadError(
                "this model has no chat template "
                "(no chat_template in tokenizer_config.json, no chat_template.jinja)"
            )
        try:
            return compile_chat_template(self.chat_template)
        except jinja2.TemplateSyntaxError as exc:
            raise ModelLoadError(f"the model's chat template does not compile: {exc}") from exc

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """Render ``messages`` ([{"role", "content"}, ...]) as the model's prompt text.

        A message may carry more keys for templates that read them (an assistant's
        ``tool_calls``, whose ``content`` may then be None; a tool result's
        ``tool_call_id``); ``tools`` (function definitions) goes to the template as
        transformers passes it. Raises ``ModelLoadError`` when the model has no (or a
        broken) template, and ``ValueError`` for malformed messages or when the template
        rejects them.
        """
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
        for i, m in enumerate(messages):
            content = m.get("content") if isinstance(m, dict) else None
            if (
                not isinstance(m, dict)
                or not isinstance(m.get("role"), str)
                or not (isinstance(content, str) or (content is None and m.get("tool_calls")))
            ):
                raise ValueError(f"message {i} needs string 'role' and 'content'")
        template = self._template
        try:
            # tools/documents are passed as None, as transformers does: templates test them
            # with ``is not none``, which an undefined variable would pass.
            return template.render(
                messages=messages,
                tools=tools or None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except jinja2.TemplateError as exc:
            raise ValueError(f"chat template: {exc}") from exc
