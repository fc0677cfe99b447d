"""ZeRO stage 3: is a model partitioned, and a context that gathers its parameters when it is.

Under ZeRO-3 (``deepspeed.zero.Init`` or ``deepspeed.initialize`` with stage 3) each rank keeps only a shard
of every parameter; the local tensor is empty and DeepSpeed marks the parameter with an id attribute
``ds_id``. Code that needs the full values (saving, export, a cached quantized weight) must either gather
them with ``deepspeed.zero.GatheredParameters`` (collective: every rank enters it) or skip the shortcut.
A model without ZeRO-3 has no ``ds_id`` anywhere and needs no gathering.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Iterable, Union

import torch
from torch import nn

Params = Union[nn.Module, torch.Tensor, Iterable[torch.Tensor]]


def _parameters(params: Params) -> list[torch.Tensor]:
    """A module's parameters (recursively), a single tensor as ``[tensor]``, or the given iterable as a list."""
    if isinstance(params, nn.Module):
        return list(params.parameters())
    if isinstance(params, torch.Tensor):
        return [params]
    return list(params)


def is_partitioned(params: Params) -> bool:
    """True when any of the parameters (of a module, one tensor, or an iterable) is a ZeRO-3 partitioned one,
    i.e. has DeepSpeed's ``ds_id`` attribute."""
    return any(hasattr(p, "ds_id") for p in _parameters(params))


def gathered(params: Params, modifier_rank=None) -> ContextManager:
    """Inside the context the full parameters are present on every rank.

    ``deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)`` when :func:`is_partitioned`
    (collective: all ranks must enter; with ``modifier_rank`` = r, changes made on rank r are broadcast on
    exit, with None they are discarded), else ``contextlib.nullcontext()`` (deepspeed is not imported).
    """
    params = _parameters(params)
    if not is_partitioned(params):
        return contextlib.nullcontext()
    from deepspeed import zero

    return zero.GatheredParameters(params, modifier_rank=modifier_rank)
