"""Incremental detokenization: token ids in, text deltas out."""

from __future__ import annotations

from collections.abc import Sequence

from loom.models.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas whose concatenation is the full decode.

    Each ``push`` decodes only a short window, vLLM style: ``ids[prefix_offset:read_offset]``
    is text already emitted, kept as left context so that decoders which strip or merge at
    the start of a sequence (SentencePiece's leading space) agree with a whole decode, and
    ``ids[read_offset:]`` is not yet emitted. Text ending in U+FFFD (a UTF-8 character split
    across byte-level tokens) is held back until the rest arrives; ``flush`` returns whatever
    is still held at the end.

    Without ``prompt_ids`` the deltas concatenate to ``decode(output_ids)``. With them the
    last few prompt ids are left context, so the deltas are the text the output adds after
    the prompt: a leading space that a lone decode would strip is then kept.
    """

    CONTEXT_IDS = 5  # prompt ids kept as left context (as vLLM does)

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_ids)[-self.CONTEXT_IDS :]
        if context and self._decode(context).endswith(REPLACEMENT_CHAR):
            context = []  # a prompt cut mid-character is no usable left context
        self.ids: list[int] = context  # context ids, then every pushed id
        self.prefix_offset = 0
        self.read_offset = len(context)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes ("" while held back)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT_CHAR):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :]
