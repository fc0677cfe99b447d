"""The training-loop side of loss-aware ternarization (see :mod:`ds_kdqat.quant.modules` for what ``v`` is).

After every applied optimizer step :func:`after_optimizer_step` gives each LAT quantizer its ``v``:

* with ``kdqat.quant.lat.second_moment: "optimizer"`` (the default) and an optimizer given, the optimizer's own
  second moment of that parameter (Adam's ``exp_avg_sq``), found where the optimizer keeps it:

  - plain PyTorch optimizer (ZeRO stage 0, fp32): ``optimizer.state[param]["exp_avg_sq"]``, taken as is (a
    reference: the optimizer updates it in place, nothing is copied);
  - DeepSpeed ZeRO 1/2 and the bf16 optimizer: each rank holds the fp32 state of its partition of flat buffers;
    the parameter's fragment (DeepSpeed's ``param._hp_mapping``, the mapping behind
    ``deepspeed.utils.safe_get_full_optimizer_state``) is copied into a zeroed full-shaped float32 buffer and
    the buffer summed over the data-parallel group, as that function does, but into a buffer kept from step to
    step instead of a fresh one;
  - DeepSpeed ZeRO-3: ``deepspeed.utils.safe_get_full_optimizer_state`` (an all-gather of the partitions);
  - DeepSpeed's fp16 wrapper (unfused, the one our optimizers get): the state of the fp32 master copy;

  so under ZeRO 1-3 this is a collective, called by every rank for the same parameters in the same order;
* otherwise (``"own"``, an optimizer without an element-wise second moment — SGD, Adafactor — or no optimizer
  given) the quantizer's own estimate, folded from the gradient its backward collected.

Which one a quantizer uses is decided once: at the first step (an optimizer's state only exists after it), or,
when training resumes from a checkpoint whose optimizer state is already loaded, by :func:`prepare_lat` before
the first forward, so a resumed run quantizes exactly as one that did not stop.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import nn

from ds_kdqat.quant.modules import QUANT_MODULE_TYPES, WeightQuantizer

logger = logging.getLogger(__name__)

SECOND_MOMENT_KEY = "exp_avg_sq"  # Adam's v in torch.optim.Adam/AdamW, our BertAdam and DeepSpeed's Adams


def lat_quantizers(model: nn.Module) -> list[tuple[str, WeightQuantizer]]:
    """``(module name, quantizer)`` of every LAT weight quantizer, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, WeightQuantizer) and m.method == "lat"]


def lat_weights(model: nn.Module) -> list[tuple[str, nn.Parameter, WeightQuantizer]]:
    """``(module name, weight parameter, quantizer)`` of every LAT-quantized module, in module order."""
    return [(name, m.weight, m.weight_quant) for name, m in model.named_modules()
            if isinstance(m, QUANT_MODULE_TYPES) and m.weight_quant.method == "lat"]


# ------------------------------------------------------------------------------------------------------------
# the optimizer's second moment


def base_optimizer(optimizer: Any) -> Optional[torch.optim.Optimizer]:
    """The PyTorch optimizer doing the update: DeepSpeed's wrappers (ZeRO, fp16, bf16) hold it as ``.optimizer``."""
    for _ in range(4):
        if isinstance(optimizer, torch.optim.Optimizer):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


class OptimizerMoments:
    """Reads the optimizer's second moment of model parameters (see the module docstring for where it lives)."""

    def __init__(self, optimizer: Any):
        self.optimizer = optimizer
        self.base = base_optimizer(optimizer)
        self.masters: dict[int, torch.Tensor] = {}  # DeepSpeed fp16 (unfused): id(model param) -> fp32 copy
        fp16_groups, fp32_groups = getattr(optimizer, "fp16_groups", None), getattr(optimizer, "fp32_groups", None)
        if self.base is not optimizer and isinstance(fp16_groups, list) and isinstance(fp32_groups, list):
            for low, high in zip(fp16_groups, fp32_groups):
                if isinstance(low, list) and isinstance(high, list):
                    self.masters.update((id(p), q) for p, q in zip(low, high))

    def keeps_moment(self) -> Optional[bool]:
        """True when every state entry of the optimizer has an element-wise ``exp_avg_sq``; False when it has
        state without one; None when it has no state (yet). The same on every rank (all hold the same kind of
        state), so a decision taken from it is too."""
        if self.base is None:
            return False
        states = [state for state in self.base.state.values() if state]
        if not states:
            return None
        return all(torch.is_tensor(state.get(SECOND_MOMENT_KEY)) for state in states)

    def kind(self, param: torch.Tensor) -> Optional[str]:
        """How ``param``'s moment is found: ``"zero3"``, ``"fragments"`` (ZeRO 1/2, bf16), ``"master"`` (fp16),
        ``"direct"``, or None (not an optimizer parameter)."""
        if self.base is None:
            return None
        if hasattr(param, "ds_id") and hasattr(param, "_z3_optimizer"):
            return "zero3"
        if hasattr(param, "_hp_mapping"):
            return "fragments"
        if id(param) in self.masters:
            return "master"
        if any(param is p for group in self.base.param_groups for p in group["params"]):
            return "direct"
        return None

    def read(self, param: torch.Tensor, kind: str, out: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """``param``'s second moment, full-shaped (a collective for ``"zero3"``/``"fragments"`` with more than one
        rank). ``"direct"``/``"master"``: the optimizer's tensor itself; otherwise a float32 tensor, written into
        ``out`` when that fits. None when the state has no such tensor of the parameter's shape."""
        if kind in ("direct", "master"):
            owner = self.masters[id(param)] if kind == "master" else param
            v = self.base.state.get(owner, {}).get(SECOND_MOMENT_KEY)
            return v if torch.is_tensor(v) and v.shape == param.shape else None
        if kind == "zero3":
            from deepspeed.utils import safe_get_full_optimizer_state

            v = safe_get_full_optimizer_state(param, SECOND_MOMENT_KEY)
            if v is None:
                return None
            if _fits(out, v):
                return out.copy_(v)
            return v.float()
        # fragments: deepspeed.utils.tensor_fragment.get_full_hp_param(param, key), into a kept buffer
        buffer = out if _fits(out, param) else torch.empty(param.shape, dtype=torch.float32, device=param.device)
        buffer.zero_()
        mapping = param._hp_mapping
        if mapping is not None:
            address = mapping.lp_fragment_address
            buffer.view(-1).narrow(0, address.start, address.numel).copy_(mapping.get_hp_fragment(SECOND_MOMENT_KEY))
        group = getattr(param, "_dp_group", None)
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(buffer, group=group)
        return buffer


def _fits(out: Optional[torch.Tensor], like: torch.Tensor) -> bool:
    return (out is not None and out.dtype == torch.float32 and out.shape == like.shape
            and out.device == like.device)


_warned: set[str] = set()


def _fall_back(name: str, quantizer: WeightQuantizer, why: str) -> None:
    quantizer.moment_source = "own"
    if why not in _warned:
        _warned.add(why)
        logger.warning("LAT: %s; %s (and any other weight for the same reason) uses its own second-moment "
                       "estimate (kdqat.quant.lat.second_moment \"own\")", why, name or "the weight")


def _wanted(model: nn.Module) -> list[tuple[str, nn.Parameter, WeightQuantizer]]:
    return [(n, p, q) for n, p, q in lat_weights(model)
            if q.lat.second_moment == "optimizer" and q.moment_source != "own"]


def prepare_lat(model: nn.Module, optimizer: Any) -> None:
    """Before training with ``optimizer``: decide each LAT quantizer's source where the optimizer already tells
    (state loaded from a checkpoint); otherwise leave it to the first step, collecting gradients until then (so
    that falling back loses nothing). No collective."""
    wanted = _wanted(model)
    if not wanted:
        return
    reader = OptimizerMoments(optimizer)
    keeps = reader.keeps_moment()
    for name, param, q in wanted:
        if keeps is None:  # a fresh optimizer: decided at the first step
            q.moment_source = None
        elif not keeps or reader.kind(param) is None:
            _fall_back(name, q, f"the optimizer ({type(reader.base).__name__}) keeps no {SECOND_MOMENT_KEY}")
        else:
            q.moment_source = "optimizer"
            q.grad_accum = None


@torch.no_grad()
def after_optimizer_step(model: nn.Module, process_group: Optional[Any] = None, optimizer: Any = None) -> int:
    """Update each LAT quantizer's second moment after an applied optimizer step (see the module docstring).

    Call once after every optimizer step that was applied (not after a step skipped on fp16 overflow), on every
    rank. ``optimizer`` (the DeepSpeed engine's ``optimizer`` or a PyTorch optimizer): where quantizers
    configured with ``second_moment: "optimizer"`` read ``v`` (a collective under ZeRO 1-3); without it every
    quantizer folds its own estimate. Folding the own estimate, with ``lat.sync_ranks`` and an initialised
    ``torch.distributed`` of more than one rank, is a collective too (one all-reduce over ``process_group``,
    default the world, of all LAT gradients flattened) that averages the per-rank gradients, as DeepSpeed's
    data-parallel reduction does. A no-op, returning 0, when the model has no LAT module; otherwise returns the
    number of quantizers updated.
    """
    updated = 0
    if optimizer is not None:
        wanted = _wanted(model)
        if wanted:
            reader = OptimizerMoments(optimizer)
            keeps = bool(reader.keeps_moment())  # after a step, no state at all means none is kept (plain SGD)
            for name, param, q in wanted:
                kind = reader.kind(param) if keeps else None
                if kind is None:
                    _fall_back(name, q, f"the optimizer ({type(reader.base).__name__}) keeps no "
                                        f"{SECOND_MOMENT_KEY} for it")
                    continue
                own_buffer = q.second_moment if kind in ("zero3", "fragments") else None
                v = reader.read(param, kind, out=own_buffer)
                if v is None:
                    _fall_back(name, q, f"no {SECOND_MOMENT_KEY} of the weight's shape in the optimizer state")
                    continue
                q.use_optimizer_moment(v)
                updated += 1
    quantizers = [q for _, q in lat_quantizers(model) if q.collects_gradient and q.grad_accum is not None]
    if not quantizers:
        return updated
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
    return updated + len(quantizers)


def lat_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LAT second moments (``"<module>.second_moment"`` → CPU float32 tensor), for checkpoints."""
    return {f"{name}.second_moment": q.second_moment.detach().float().cpu()
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
