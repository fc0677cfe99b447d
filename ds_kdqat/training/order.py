"""The order in which examples are seen: deterministic, shardable across ranks, resumable mid-epoch.

Epoch e uses the permutation of the dataset drawn from ``seed + e``. It is cut into global batches of
``micro_batch · ranks`` examples (``drop_last``: the short tail is not used, so every rank makes the same
number of steps), and rank r takes the r-th slice of each global batch. One rank with a micro batch of
``micro_batch · ranks`` therefore sees exactly the examples that R ranks see together in the same step,
which is what makes multi-rank losses comparable with one-rank losses.
"""

from __future__ import annotations

from typing import Iterator

import torch


def micro_batches_per_epoch(num_examples: int, micro_batch: int, world_size: int) -> int:
    return num_examples // (micro_batch * world_size)


def epoch_micro_batches(
    num_examples: int, micro_batch: int, rank: int, world_size: int, seed: int, epoch: int, start: int = 0
) -> Iterator[list[int]]:
    """Example indices of this rank's micro batches in ``epoch``, from micro batch ``start`` on."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_examples, generator=generator).tolist()
    global_batch = micro_batch * world_size
    for index in range(start, micro_batches_per_epoch(num_examples, micro_batch, world_size)):
        base = index * global_batch + rank * micro_batch
        yield order[base : base + micro_batch]
