"""The README's custom strategy, verbatim: it must run as written."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

from loom import SamplingParams
from loom.router.router import RoutedRequest

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_strategy() -> type:
    text = README.read_text()
    block = re.search(r"```python\n(from loom.router.router import .*?)```", text, re.S)
    assert block is not None, "the README's strategy example is missing"
    code = block.group(1)
    assert len(code.strip().splitlines()) <= 22  # "fits in about 20 lines"
    scope: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), scope)
    return scope["LongPromptsDisaggregated"]  # type: ignore[no-any-return]


def test_the_readme_strategy_runs_and_gives_greedy_outputs(engines: list[Any], llm: Any) -> None:
    cls = readme_strategy()
    short = list(range(200, 240))
    long = [(i * 31) % 1700 + 200 for i in range(300)]

    async def scenario() -> list[tuple[str, RoutedRequest]]:
        router = cls([e.url for e in engines])
        out = []
        try:
            for k, p in enumerate((short, long)):
                req = RoutedRequest(
                    p, f"readme-{k}", {"max_tokens": 5, "temperature": 0, "ignore_eos": True}
                )
                text = []
                async for chunk in router.handle(req):
                    text += [c.get("text") or "" for c in chunk.get("choices", [])]
                out.append(("".join(text), req))
        finally:
            await router.close()
        return out

    (short_text, short_req), (long_text, long_req) = asyncio.run(scenario())
    greedy = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    assert short_text == llm.generate([short], greedy)[0].text
    assert long_text == llm.generate([long], greedy)[0].text
    assert short_req.transferred_bytes == 0 and long_req.transferred_bytes > 0
