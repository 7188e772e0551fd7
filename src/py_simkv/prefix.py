"""Prefix reuse, the one rule `Llama` (one conversation) and `Sequences` (several) share: how many leading
tokens of a new prompt a conversation already holds, and how many of them to keep."""
from __future__ import annotations

from typing import Sequence


def common_prefix(held: Sequence[int], tokens: Sequence[int]) -> int:
    """How many leading tokens the two sequences share."""
    n = 0
    for a, b in zip(held, tokens):
        if int(a) != int(b):
            break
        n += 1
    return n


def positions_to_keep(held: Sequence[int], tokens: Sequence[int]) -> int:
    """Positions of `held` to keep before evaluating `tokens` as a whole prompt: their common prefix, but never
    all of `tokens`, so that the last one is evaluated again and its logits are fresh. 0: start over."""
    keep = common_prefix(held, tokens)
    return keep - 1 if keep == len(tokens) and keep > 0 else keep
