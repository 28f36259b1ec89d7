from pathlib import Path

import pytest

from loom.errors import ModelLoadError
from loom.models.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Hello world!",
    "  leading spaces",
    "Café, naïve — déjà vu",
    "Emoji 🙂🚀 mix",
    "日本語のテキスト",
    "def f(x):\n    return x * 2",
    "",
]


def test_encode_matches_transformers(tiny_dir: Path) -> None:
    from transformers import AutoTokenizer

    ours, ref = Tokenizer.from_dir(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir)
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == ref.encode(
            text, add_special_tokens=False
        ), text
        assert ours.decode(ours.encode(text)) == text


def test_special_tokens(tiny_dir: Path) -> None:
    tok = Tokenizer.from_dir(tiny_dir)
    assert tok.bos_token_id == 0 and tok.eos_token_ids == (1,) and tok.vocab_size == 2048
    assert tok.encode("x")[0] == tok.bos_token_id


def test_chat_template_matches_transformers(tiny_dir: Path) -> None:
    from transformers import AutoTokenizer

    ours, ref = Tokenizer.from_dir(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "🙂?"},
    ]
    for gen in (True, False):
        assert ours.apply_chat_template(
            messages, add_generation_prompt=gen
        ) == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    with pytest.raises(ValueError, match="role"):
        ours.apply_chat_template([{"content": "no role"}])


@pytest.mark.parametrize("text", TEXTS[:-1])
def test_incremental_detokenizer_deltas_concatenate_to_the_full_decode(
    tiny_dir: Path, text: str
) -> None:
    tok = Tokenizer.from_dir(tiny_dir)
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(i) for i in ids]
    assert "".join(deltas) + detok.flush() == tok.decode(ids)
    assert all("\ufffd" not in d for d in deltas)


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot load"):
        Tokenizer.from_dir(tmp_path)
