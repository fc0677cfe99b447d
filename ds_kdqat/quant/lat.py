"""The training-loop side of loss-aware ternarization (see :mod:`ds_kdqat.quant.modules` for what ``v`` is)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ds_kdqat.quant.modules import WeightQuantizer


def lat_quantizers(model: nn.Module) -> list[tuple[str, WeightQuantizer]]:
    """``(module name, quantizer)`` of every LAT weight quantizer, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, WeightQuantizer) and m.method == "lat"]


@torch.no_grad()
def after_optimizer_step(model: nn.Module, process_group: Optional[Any] = None) -> int:
    """Fold the gradient accumulated since the last call into each LAT quantizer's second moment.

    Call once after every optimizer step that was applied (not after a step skipped on fp16 overflow), on every
    rank: with ``lat.sync_ranks`` and an initialised ``torch.distributed`` of more than one rank this is a
    collective (one all-reduce over ``process_group``, default the world, of all LAT gradients flattened) that
    averages the per-rank gradients, as DeepSpeed's data-parallel reduction does. A no-op, returning 0, when the
    model has no LAT module; otherwise returns the number of quantizers updated.
    """
    quantizers = [q for _, q in lat_quantizers(model) if q.grad_accum is not None]
    if not quantizers:
        return 0
    grads = [q.grad_accum for q in quantizers]
    dist = torch.distributed
    if quantizers[0].lat.sync_ranks and dist.is_available() and dist.is_initialized():
        world = dist.get_world_size(process_group)
        if world > 1:
            by_device: dict[torch.device, list[int]] = {}
            for i, g in enumerate(grads):
                by_device.setdefault(g.device, []).append(i)
            for indices in by_device.values():
                flat = torch.cat([grads[i].reshape(-1) for i in indices])
                dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=process_group)  # AVG is not in gloo
                flat.div_(world)
                offset = 0
                for i in indices:
                    n = grads[i].numel()
                    grads[i] = flat[offset:offset + n].view_as(grads[i])
                    offset += n
    for q, g in zip(quantizers, grads):
        q.fold_gradient(g)
        q.grad_accum.zero_()
    return len(quantizers)


def lat_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LAT second moments (``"<module>.second_moment"`` → CPU float32 tensor), for checkpoints."""
    return {f"{name}.second_moment": q.second_moment.detach().cpu()
            for name, q in lat_quantizers(model) if q.second_moment is not None}


def load_lat_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Restore :func:`lat_state`; every key must name a LAT quantizer of ``model``."""
    quantizers = dict(lat_quantizers(model))
    for key, value in state.items():
        name = key.removesuffix(".second_moment")
        if not key.endswith(".second_moment") or name not in quantizers:
            raise KeyError(f"{key!r} is not the second moment of a LAT quantizer of this model")
        q = quantizers[name]
        q.second_moment = value.detach().float().clone()
        q.version += 1
