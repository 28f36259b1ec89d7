"""The example inferlets end at the model's end-of-sequence token (unless told to ignore
it): checked on a copy of the tiny model whose end-of-sequence tokens include a token the
model is known to produce greedily a few steps in."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from loom import LLM, SamplingParams
from loom.sdk.build import build_inferlet
from tests.runtime_helpers import run_inferlet

INFERLETS = Path(__file__).resolve().parents[2] / "inferlets"
N = 12


def _greedy(model: Path, ids: list[int]) -> list[int]:
    params = SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True)
    return list(LLM(str(model), num_pages=32).generate([ids], params)[0].token_ids)


def _reply(rt: object, program: str, *args: str) -> str:
    result, messages = run_inferlet(rt, program, *args)
    assert result.ok, result.error
    return messages[-1]


def _first_new(seq: list[int], avoid: set[int]) -> int:
    """An index >= 2 whose token neither occurs earlier in ``seq`` nor is in ``avoid``."""
    return next(i for i in range(2, len(seq)) if seq[i] not in seq[:i] and seq[i] not in avoid)


def test_text_completion_and_chat_stop_at_end_of_sequence(tiny_dir: Path, tmp_path: Path) -> None:
    from loom.config import EngineConfig, RuntimeConfig
    from loom.models.tokenizer import Tokenizer
    from loom.runtime.runtime import start_runtime

    prompt, message = "Once upon a time", "Tell me a story"
    tok = Tokenizer.from_dir(tiny_dir)
    text_ids = tok.encode(prompt, add_special_tokens=False)
    chat_prompt = tok.apply_chat_template([{"role": "user", "content": message}],
                                          add_generation_prompt=True)  # fmt: skip
    chat_ids = tok.encode(chat_prompt, add_special_tokens=False)
    text_out, chat_out = _greedy(tiny_dir, text_ids), _greedy(tiny_dir, chat_ids)
    k = _first_new(text_out, set())
    j = _first_new(chat_out, set(text_out[: k + 1]))
    assert text_out[k] not in chat_out[:j]
    # The same weights, two more end-of-sequence tokens: the k-th and j-th greedy tokens.
    model = tmp_path / "tiny-eos"
    shutil.copytree(tiny_dir, model)
    gen_path = model / "generation_config.json"
    gen = json.loads(gen_path.read_text())
    old = gen.get("eos_token_id")
    old_ids = old if isinstance(old, list) else ([] if old is None else [old])
    gen["eos_token_id"] = [*old_ids, text_out[k], chat_out[j]]
    gen_path.write_text(json.dumps(gen))

    rt = start_runtime(EngineConfig(model=str(model), num_pages=64), RuntimeConfig(),
                       worker_mode="thread", cache_dir=tmp_path / "programs")  # fmt: skip
    try:
        completion = rt.add_program(build_inferlet(INFERLETS / "text_completion").read_bytes())
        chat = rt.add_program(build_inferlet(INFERLETS / "chat").read_bytes())
        for mode in ("fast", "steps"):
            assert _reply(rt, completion, prompt, str(N), mode) == tok.decode(text_out[:k])
            assert _reply(rt, completion, prompt, str(N), mode, "ignore") == tok.decode(text_out)
        assert _reply(rt, chat, message, str(N)) == tok.decode(chat_out[:j])
        assert _reply(rt, chat, message, str(N), "ignore") == tok.decode(chat_out)
    finally:
        rt.close()
