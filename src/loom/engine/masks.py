"""BRLE (binary run-length encoded) masks: decoding to boolean tensors.

A row is a list of alternating run lengths starting with a (possibly empty) run of
``false``; ``true`` means masked out. ``[3, 2, 4]`` is F F F T T F F F F.
"""

from __future__ import annotations

import torch


def decode_brle(runs: list[int], device: torch.device | None = None) -> torch.Tensor:
    """One BRLE row -> bool tensor [sum(runs)], true = masked out."""
    counts = torch.tensor(runs, dtype=torch.long, device=device)
    values = torch.arange(len(runs), device=device) % 2 == 1  # F, T, F, T, ...
    return torch.repeat_interleave(values, counts)


def encode_brle(mask: list[bool]) -> list[int]:
    """Inverse of ``decode_brle`` (for tests and the SDK)."""
    runs: list[int] = []
    current, count = False, 0
    for bit in mask:
        if bit == current:
            count += 1
        else:
            runs.append(count)
            current, count = bit, 1
    runs.append(count)
    return runs


def decode_rows(rows: list[list[int]], width: int, device: torch.device) -> torch.Tensor:
    """BRLE rows of a pass -> bool [len(rows), width] of *attendable* slots.

    Row i decodes to ``width - len(rows) + i + 1`` entries; slots past its end (later new
    tokens) are not attendable.
    """
    allowed = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
    for i, runs in enumerate(rows):
        row = ~decode_brle(runs, device)
        allowed[i, : row.shape[0]] = row
    return allowed
