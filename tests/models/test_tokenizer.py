"""``loom.models.tokenizer`` against ``transformers.AutoTokenizer`` on locally made tokenizers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from loom.errors import ModelLoadError
from loom.models.corpus import tiny_corpus
from loom.models.detokenizer import IncrementalDetokenizer
from loom.models.tokenizer import Tokenizer

TEXTS = [
    "Hello world!",
    "  leading spaces",
    "Café, naïve — déjà vu",
    "Emoji 🙂🚀 mix 👩‍👩‍👧",
    "日本語のテキスト",
    "def f(x):\n    return x * 2\t# tab",
    "The answer is 4194.",
    "<|user|>\nHi<|end|>\n<s>",
    "",
]
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "🙂?"},
]


def auto_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data))


def copy_tokenizer(src: Path, dst: Path, **config_changes: Any) -> Path:
    """``src``'s tokenizer files in ``dst``, with ``tokenizer_config.json`` fields changed."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "tokenizer.json", dst / "tokenizer.json")
    config = json.loads((src / "tokenizer_config.json").read_text())
    config.update(config_changes)
    write_json(dst / "tokenizer_config.json", {k: v for k, v in config.items() if v is not None})
    return dst


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama/Mistral-style tokenizer: SentencePiece-converted BPE with byte fallback
    (``<0x..>`` tokens), ``▁`` for spaces, a decoder that strips the leading space."""
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    specials = ["<unk>", "<s>", "</s>"]
    trained = HFTokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = metaspace
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False)
    trained.train_from_iterator(tiny_corpus(2000), trainer=trainer)
    model = json.loads(trained.to_str())["model"]
    # SentencePiece layout: specials, the 256 byte tokens, then the learned pieces.
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for piece, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [(a, b) for a, b in model["merges"]]
    tok = HFTokenizer(
        models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.pre_tokenizer = metaspace
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    out = tmp_path_factory.mktemp("llama-tok")
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "chat_template": "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}",
    }
    write_json(out / "tokenizer_config.json", config)
    write_json(out / "generation_config.json", {"bos_token_id": 1, "eos_token_id": [2, 0]})
    return out


@pytest.mark.parametrize("which", ["tiny", "llama"])
def test_encode_and_decode_match_transformers(tiny_dir: Path, llama_dir: Path, which: str) -> None:
    path = tiny_dir if which == "tiny" else llama_dir
    ours, ref = Tokenizer.from_dir(path), auto_tokenizer(path)
    assert ours.vocab_size == len(ref)
    assert ours.bos_token_id == ref.bos_token_id
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ids[0] == ours.bos_token_id
        plain = ours.encode(text, add_special_tokens=False)
        assert plain == ref.encode(text, add_special_tokens=False), text
        for skip in (True, False):
            assert ours.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip), text
    assert ours.decode(ours.encode("Café 🙂 end")) == "Café 🙂 end"


def test_tiny_special_tokens(tiny_dir: Path) -> None:
    tok = Tokenizer.from_dir(tiny_dir)
    assert (tok.bos_token_id, tok.eos_token_ids, tok.vocab_size) == (0, (1,), 2048)
    assert [tok.token_to_id(t) for t in ("<pad>", "<|user|>", "<|end|>")] == [2, 4, 6]
    assert tok.id_to_token(5) == "<|assistant|>" and tok.token_to_id("no such token") is None
    assert tok.decode([0, 4, 1, 999_999]) == ""  # specials skipped, unknown ids dropped


def test_eos_ids_are_the_union_of_both_configs(llama_dir: Path) -> None:
    tok = Tokenizer.from_dir(llama_dir)
    assert tok.bos_token_id == 1 and tok.eos_token_ids == (2, 0)


def test_config_special_tokens_missing_from_tokenizer_json_are_added(
    tiny_dir: Path, tmp_path: Path
) -> None:
    path = copy_tokenizer(
        tiny_dir,
        tmp_path,
        pad_token="<|pad|>",
        unk_token="<unk>",
        additional_special_tokens=["<|tool|>", "<|end|>"],
    )
    write_json(path / "generation_config.json", {"eos_token_id": [6, 1]})
    ours, ref = Tokenizer.from_dir(path), auto_tokenizer(path)
    assert ours.vocab_size == len(ref) == 2051
    text = "a<|pad|>b <unk> <|tool|> c<|end|>"
    assert ours.encode(text) == ref.encode(text)
    assert ours.decode(ours.encode(text)) == ref.decode(ref.encode(text), skip_special_tokens=True)
    assert ours.eos_token_ids == (1, 6)


def test_special_tokens_given_as_objects(tiny_dir: Path, tmp_path: Path) -> None:
    # Older tokenizer_config.json files store {"__type": "AddedToken", "content": ...}.
    bos = {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False}
    eos = {"__type": "AddedToken", "content": "<|end|>", "rstrip": False}
    tok = Tokenizer.from_dir(copy_tokenizer(tiny_dir, tmp_path, bos_token=bos, eos_token=eos))
    assert (tok.bos_token, tok.bos_token_id, tok.eos_token_ids) == ("<s>", 0, (6,))


def test_bos_follows_the_tokenizer_json_post_processor(tiny_dir: Path, tmp_path: Path) -> None:
    # transformers 5 ignores add_bos_token when tokenizer.json exists; so must we.
    no_pp = json.loads((tiny_dir / "tokenizer.json").read_text())
    no_pp["post_processor"] = None
    for name, data, add_bos in [
        ("config-says-no", None, False),
        ("no-post-processor", no_pp, True),
    ]:
        path = copy_tokenizer(tiny_dir, tmp_path / name, add_bos_token=add_bos)
        if data is not None:
            write_json(path / "tokenizer.json", data)
        ours, ref = Tokenizer.from_dir(path), auto_tokenizer(path)
        assert ours.encode("Hello") == ref.encode("Hello"), name
        assert (ours.encode("Hello")[0] == 0) == (data is None), name


def test_chat_template_matches_transformers(tiny_dir: Path, llama_dir: Path) -> None:
    for path in (tiny_dir, llama_dir):
        ours, ref = Tokenizer.from_dir(path), auto_tokenizer(path)
        for gen in (True, False):
            expected = ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(MESSAGES, add_generation_prompt=gen) == expected
    text = Tokenizer.from_dir(tiny_dir).apply_chat_template(MESSAGES[1:2])
    assert text == "<|user|>\nHi!<|end|>\n<|assistant|>\n"


# Exercises what transformers' environment adds: tojson options, loop controls, namespace,
# {% generation %}, raise_exception, special-token variables, tools=None, trim/lstrip blocks.
FEATURE_TEMPLATE = """\
{{ bos_token }}{% set ns = namespace(n=0) %}
{% if tools is not none %}{{ raise_exception('no tools') }}{% endif %}
{% for m in messages %}
    {% if m['role'] == 'stop' %}{% break %}{% endif %}
    {% if m['role'] == 'skip' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
    {% if m['role'] == 'assistant' %}
{% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %}
    {% else %}
{{ m | tojson }}|{{ m | tojson(indent=1, sort_keys=true) }}|{{ '<é>' | tojson }}
    {% endif %}
{% endfor %}
{{ ns.n }}{% if add_generation_prompt %}>{{ pad_token }}{% endif %}"""


def test_chat_template_environment_matches_transformers(tiny_dir: Path, tmp_path: Path) -> None:
    # chat_template.jinja takes priority over the config entry, as in transformers.
    path = copy_tokenizer(tiny_dir, tmp_path)
    (path / "chat_template.jinja").write_text(FEATURE_TEMPLATE)
    ours, ref = Tokenizer.from_dir(path), auto_tokenizer(path)
    messages = [
        {"role": "user", "content": 'say "hi" <b>é</b>', "name": "x"},
        {"role": "skip", "content": "hidden"},
        {"role": "assistant", "content": "hi"},
        {"role": "stop", "content": ""},
        {"role": "user", "content": "never shown"},
    ]
    for gen in (True, False):
        expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert ours.apply_chat_template(messages, add_generation_prompt=gen) == expected


def test_named_template_list_uses_default(tiny_dir: Path, tmp_path: Path) -> None:
    templates = [
        {"name": "tool_use", "template": "tools"},
        {"name": "default", "template": "{{ messages[0]['content'] }}!"},
    ]
    path = copy_tokenizer(tiny_dir, tmp_path, chat_template=templates)
    assert Tokenizer.from_dir(path).apply_chat_template([{"role": "user", "content": "x"}]) == "x!"


def test_chat_template_errors(tiny_dir: Path, tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(tiny_dir)
    with pytest.raises(ValueError, match="role"):
        tok.apply_chat_template([{"content": "no role"}])
    with pytest.raises(ValueError, match="content"):
        tok.apply_chat_template([{"role": "user", "content": None}])  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="non-empty"):
        tok.apply_chat_template([])
    with pytest.raises(ValueError, match="unknown role tool"):  # raised by the template
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    path = copy_tokenizer(tiny_dir, tmp_path / "none", chat_template=None)
    with pytest.raises(ModelLoadError, match="no chat template"):
        Tokenizer.from_dir(path).apply_chat_template(MESSAGES)
    path = copy_tokenizer(tiny_dir, tmp_path / "broken", chat_template="{% for %}")
    with pytest.raises(ModelLoadError, match="does not compile"):
        Tokenizer.from_dir(path).apply_chat_template(MESSAGES)


def stream(tok: Tokenizer, ids: list[int], **kwargs: Any) -> list[str]:
    """Every delta, then the flush."""
    detok = IncrementalDetokenizer(tok, **kwargs)
    return [detok.push(i) for i in ids] + [detok.flush()]


@pytest.mark.parametrize("which", ["tiny", "llama"])
def test_incremental_deltas_concatenate_to_the_full_decode(
    tiny_dir: Path, llama_dir: Path, which: str
) -> None:
    tok = Tokenizer.from_dir(tiny_dir if which == "tiny" else llama_dir)
    for text in TEXTS:
        ids = tok.encode(text)  # BOS included: skipped special tokens are handled too
        deltas = stream(tok, ids)
        assert "".join(deltas) == tok.decode(ids), text
        assert all("\ufffd" not in d for d in deltas), text
        with_specials = stream(tok, ids, skip_special_tokens=False)
        assert "".join(with_specials) == tok.decode(ids, skip_special_tokens=False), text


def byte_level_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character map that byte-level BPE vocabularies use."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


def test_a_character_split_over_byte_tokens_is_held_back(tiny_dir: Path) -> None:
    tok = Tokenizer.from_dir(tiny_dir)
    byte_char = byte_level_chars()
    # One token per byte: "a", then the 4 bytes of 🚀, then "b".
    ids = [tok.token_to_id(byte_char[b]) for b in "a🚀b".encode()]
    assert None not in ids
    deltas = stream(tok, ids)  # type: ignore[arg-type]
    assert deltas == ["a", "", "", "", "🚀", "b", ""]
    # A stream that ends mid-character gives the replacement character only at flush.
    deltas = stream(tok, ids[:3])  # type: ignore[arg-type]
    assert deltas == ["a", "", "", tok.decode(ids[1:3])]  # type: ignore[arg-type]


def test_byte_fallback_tokens_are_held_back(llama_dir: Path) -> None:
    tok = Tokenizer.from_dir(llama_dir)
    ids = tok.encode("x 🚀 y", add_special_tokens=False)
    deltas = stream(tok, ids)
    assert "".join(deltas) == "x 🚀 y" and "🚀" in deltas


def test_prompt_context_keeps_the_leading_space(llama_dir: Path) -> None:
    tok = Tokenizer.from_dir(llama_dir)
    prompt, output = tok.encode("The model reads"), tok.encode(" a long story", False)
    assert "".join(stream(tok, output)) == tok.decode(output) == "a long story"
    with_context = "".join(stream(tok, output, prompt_ids=prompt))
    assert with_context == " a long story"
    assert tok.decode(prompt + output) == tok.decode(prompt) + with_context


def test_window_stays_short(tiny_dir: Path) -> None:
    tok = Tokenizer.from_dir(tiny_dir)
    detok = IncrementalDetokenizer(tok)
    for i in tok.encode(" ".join(tiny_corpus(50)), add_special_tokens=False):
        detok.push(i)
        assert len(detok.ids) - detok.prefix_offset <= 8  # decodes a window, not everything


def test_unloadable_files_are_named(tmp_path: Path, tiny_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json not found"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"cannot load .*tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)
    shutil.copy(tiny_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ModelLoadError, match=r"tokenizer_config\.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match="JSON object"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    tok = Tokenizer.from_dir(tmp_path)  # tokenizer.json alone is enough
    assert tok.bos_token_id is None and tok.eos_token_ids == () and tok.chat_template is None
