"""A deterministic text corpus for training the tiny model's BPE tokenizer locally.

Sentences are drawn from small word lists with a fixed seed, so every machine trains the
same tokenizer without downloading anything. It includes digits, punctuation, code-like
lines and some non-ASCII text so byte-level merges cover more than plain English.
"""

from __future__ import annotations

import random

_SUBJECTS = [
    "the model",
    "a small robot",
    "my friend",
    "the server",
    "every user",
    "the old library",
    "a quiet river",
    "the scheduler",
    "our team",
    "the cat",
    "a curious child",
    "the engine",
    "the weather",
    "this program",
    "the teacher",
    "a distant star",
    "the city",
    "the market",
]
_VERBS = [
    "reads",
    "writes",
    "computes",
    "remembers",
    "explains",
    "builds",
    "finds",
    "answers",
    "carries",
    "watches",
    "opens",
    "sends",
    "counts",
    "sorts",
    "draws",
    "follows",
    "learns",
]
_OBJECTS = [
    "a long story",
    "the first page",
    "many numbers",
    "a simple question",
    "the next token",
    "an old map",
    "the right answer",
    "a bright light",
    "the shared cache",
    "twelve apples",
    "a red balloon",
    "the whole plan",
    "a careful message",
    "the evening news",
    "a new idea",
]
_TAILS = [
    "before the sun goes down",
    "with great care",
    "in the morning",
    "again and again",
    "without a single error",
    "for the whole family",
    "as fast as it can",
    "on a rainy day",
    "because it matters",
    "while everyone sleeps",
    "at the end of the week",
    "in silence",
]
_QUESTIONS = [
    "What is the capital of France?",
    "How many pages are free?",
    "Why is the sky blue?",
    "Can you write a short poem?",
    "Which path is shorter?",
    "Where did the river go?",
]
_EXTRA = [
    "Café, naïve, über, jalapeño — déjà vu.",
    "日本語のテキストも少しあります。",
    "Emoji: 🙂 🚀 ✨",
    "Ελληνικά και русский текст.",
    "def add(a, b):\n    return a + b",
    "for i in range(10): print(i * i)",
    '{"name": "loom", "pages": 16, "ok": true}',
]


def tiny_corpus(num_sentences: int = 6000, seed: int = 1234) -> list[str]:
    """The training lines (same list on every call)."""
    rng = random.Random(seed)
    lines: list[str] = []
    for i in range(num_sentences):
        kind = i % 10
        if kind < 6:
            s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
            if rng.random() < 0.6:
                s += f" {rng.choice(_TAILS)}"
            lines.append(s[0].upper() + s[1:] + rng.choice([".", ".", "!", "?"]))
        elif kind < 8:
            lines.append(f"{rng.choice(_QUESTIONS)} The answer is {rng.randint(0, 9999)}.")
        else:
            lines.append(rng.choice(_EXTRA))
    return lines
