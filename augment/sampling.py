"""Drawing new sentences from per-word candidate lists (the random part of the algorithm).

For one sentence of words ``w_1 … w_n`` with candidate lists ``C_j`` for the eligible positions j (in
increasing order), one draw builds a copy where, for each eligible j in turn, a candidate ``c`` is picked
uniformly from ``C_j`` and then a uniform ``u`` in [0, 1) is drawn; ``w_j`` becomes ``c`` when ``u < p``.
``N`` draws are made; a draw equal to the (normalised) original or to an earlier draw is dropped, so at most
N new sentences come out, words joined by single spaces.

``C_j`` is used as a sorted set, so only which words are candidates matters, not how they ranked (float noise
from batching cannot then change a draw). The random stream of example i is seeded from (seed, i) alone,
so the output does not depend on batching, workers, shards or resumes.
"""

from __future__ import annotations

import random
from typing import Mapping, Sequence


def example_rng(seed: int, index: int) -> random.Random:
    """The random stream of example ``index`` (a function of ``seed`` and ``index`` only)."""
    return random.Random(f"ds-kdqat-augment/{seed}/{index}")


def draw_sentences(
    words: Sequence[str], candidates: Mapping[int, Sequence[str]], p: float, n: int, rng: random.Random
) -> list[str]:
    """Up to ``n`` distinct new sentences; ``candidates[j]`` (non-empty) for each eligible position j."""
    positions = sorted(candidates)
    pools = [sorted(set(candidates[j])) for j in positions]
    original = " ".join(words)
    seen = {original}
    out: list[str] = []
    for _ in range(n):
        new = list(words)
        for j, pool in zip(positions, pools):
            choice = rng.choice(pool)
            if rng.random() < p:
                new[j] = choice
        sentence = " ".join(new)
        if sentence not in seen:
            seen.add(sentence)
            out.append(sentence)
    return out
