"""The generic training loop: micro batches in the seeded order, phases by step, callbacks at the boundaries.

It knows nothing of models, losses or files: the step function does one micro batch, the callbacks
(:mod:`ds_kdqat.training.callbacks`) log, evaluate, checkpoint and stop.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

from ..distill.phases import Phase, phase_at
from .callbacks import Callback, LoopState
from .order import epoch_micro_batches, micro_batches_per_epoch


def ordered_micro_batches(num_examples: int, micro_batch: int, rank: int, world_size: int, seed: int,
                          start: int) -> Iterator[list[int]]:
    """This rank's micro batches (example indices) from global micro batch ``start`` on, epoch after epoch
    (the order of :func:`~ds_kdqat.training.order.epoch_micro_batches`); endless."""
    per_epoch = micro_batches_per_epoch(num_examples, micro_batch, world_size)
    micro = start
    while True:
        epoch, index = divmod(micro, per_epoch)
        for ids in epoch_micro_batches(num_examples, micro_batch, rank, world_size, seed, epoch, start=index):
            yield ids
            micro += 1


def run_loop(batches: Iterator[Any], step: Callable[[Any, Phase], dict[str, float]], phases: Sequence[Phase],
             state: LoopState, accumulation: int, callbacks: Sequence[Callback]) -> None:
    """Run ``step`` on micro batches from ``batches`` until ``state.total_steps`` optimizer steps are done or
    a callback sets ``state.stopping``.

    ``step(batch, phase)`` returns the micro batch's logged terms (floats), ``phase`` being the one of
    ``phases`` (in step order) that holds the current optimizer step; every ``accumulation`` micro batches
    make one optimizer step. ``state`` (resumed or fresh) is updated in place: ``phase``, ``terms``,
    ``micro`` and, at step ends, ``step``. ``phases`` and ``state.total_steps`` are read afresh at every micro
    batch, so a callback may change the plan (a Teacher-Intervention phase that ends early). Callbacks are called in order: ``on_micro_end`` after each micro batch,
    ``on_step_end`` after each optimizer step, ``on_train_begin``/``on_train_end`` around the loop (the
    latter however it ends).
    """
    try:
        for callback in callbacks:
            callback.on_train_begin(state)
        while state.micro < state.total_steps * accumulation and not state.stopping:
            state.phase = phase_at(phases, state.step)
            state.terms = step(next(batches), state.phase)
            state.micro += 1
            for callback in callbacks:
                callback.on_micro_end(state)
            if state.micro % accumulation:
                continue
            state.step += 1
            for callback in callbacks:
                callback.on_step_end(state)
    finally:
        for callback in callbacks:
            callback.on_train_end(state)
