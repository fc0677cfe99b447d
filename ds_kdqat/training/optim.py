"""Optimizers and the learning-rate schedule used by every stage.

BertAdam is Adam as in the BERT / TernaryBERT code: no bias correction, weight decay decoupled from the
gradient (added to the update), ``eps`` outside the square root:

    m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²;  w ← w − lr·(m / (√v + eps) + wd·w)

Its ``v`` (state key ``exp_avg_sq``) is what loss-aware ternarization weights with by default
(``kdqat.quant.lat.second_moment``). The reference BertAdam (``pytorch_pretrained_bert`` 0.6.2, which TernaryBERT
uses with its default ``max_grad_norm=1.0``) also clips each parameter's gradient to norm ``max_grad_norm``
on its own before the update (``clip_grad_norm_(p, max_grad_norm)``, per parameter, not global); here that is
``max_grad_norm`` (``kdqat.train/finetune.bertadam_max_grad_norm``), off (0) by default because ds-kdqat clips
through DeepSpeed's global ``gradient_clipping`` instead. ``bertadam_max_grad_norm: 1.0`` with
``gradient_clipping: 0`` is the reference's update.

ZeRO-Offload (``zero_optimization.offload_optimizer.device`` ``"cpu"``/``"nvme"``) keeps the fp32 master
partition and the optimizer state on the host, where DeepSpeed insists on its own vectorised
``DeepSpeedCPUAdam`` (a JIT-built C++ op, cached under ``TORCH_EXTENSIONS_DIR``). It computes exactly our two
Adams: with ``adamw_mode=True`` the decay is decoupled, ``w ← w − lr·wd·w − lr·m̂/(√v̂ + eps)``, with
``m̂ = m/(1 − β1ᵗ)``, ``v̂ = v/(1 − β2ᵗ)`` under ``bias_correction=True`` (= ``torch.optim.AdamW``) and
``m̂ = m``, ``v̂ = v`` without (= BertAdam, whose decay term ``lr·wd·w`` uses the weight before the update
as well); its state keeps ``exp_avg_sq``, so LAT reads it as it reads ours. :func:`build_optimizer` picks it
with ``cpu_offload=True``; Adafactor and BertAdam's per-parameter clipping have no such counterpart (the
config refuses both at ZeRO stages 1-3, the only stages that offload).
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

NO_DECAY_MARKERS = ("bias", "LayerNorm.weight", "layer_norm.weight", "layernorm.weight")


class BertAdam(torch.optim.Optimizer):
    """Adam without bias correction and with decoupled weight decay (see the module docstring).

    ``max_grad_norm`` > 0: first scale each parameter's gradient, in place, to L2 norm at most ``max_grad_norm``
    (``g ← g·min(1, max_grad_norm / (‖g‖ + 1e-6))``, ``torch.nn.utils.clip_grad_norm_`` on that parameter alone,
    as the reference BertAdam). The optimizer must then see whole parameters: at ZeRO stage 0 it does (also
    with fp16/bf16, through DeepSpeed's per-parameter fp32 master copies), under ZeRO 1-3 it sees flat
    partitions instead (the config refuses that combination).
    """

    def __init__(self, params, lr: float = 5e-5, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 max_grad_norm: float = 0.0):
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not (isinstance(max_grad_norm, (int, float)) and math.isfinite(max_grad_norm) and max_grad_norm >= 0):
            raise ValueError(f"max_grad_norm must be a finite number >= 0 (0: no clipping), got {max_grad_norm!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      max_grad_norm=max_grad_norm))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                max_norm = group.get("max_grad_norm", 0.0)
                if max_norm > 0:
                    # clip_grad_norm_(param, max_norm): coefficient max/(norm + 1e-6), capped at 1, in place
                    grad.mul_((max_norm / (torch.linalg.vector_norm(grad, dtype=torch.float32) + 1e-6))
                              .clamp_(max=1.0).to(grad.dtype))
                state = self.state[param]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                update = exp_avg / (exp_avg_sq.sqrt() + group["eps"])
                if group["weight_decay"] > 0:
                    update.add_(param, alpha=group["weight_decay"])
                param.add_(update, alpha=-group["lr"])
        return loss


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into decayed and not decayed (biases and LayerNorm weights)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if any(marker in name for marker in NO_DECAY_MARKERS) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(name: str, groups: Iterable[dict], lr: float, betas, eps: float,
                    bertadam_max_grad_norm: float = 0.0, cpu_offload: bool = False) -> torch.optim.Optimizer:
    """``bertadam`` | ``adamw`` | ``adafactor`` over ``groups`` (each carrying its weight decay);
    ``bertadam_max_grad_norm``: BertAdam's per-parameter clipping (must be 0 for the others).
    ``cpu_offload``: the optimizer state lives on the host (ZeRO-Offload): the same update by DeepSpeed's
    ``DeepSpeedCPUAdam`` (see the module docstring)."""
    groups = list(groups)
    if bertadam_max_grad_norm and name != "bertadam":
        raise ValueError(f"per-parameter gradient clipping is BertAdam's; got {bertadam_max_grad_norm} for {name}")
    if cpu_offload:
        return _cpu_adam(name, groups, lr, betas, eps, bertadam_max_grad_norm)
    if name == "bertadam":
        return BertAdam(groups, lr=lr, betas=betas, eps=eps, max_grad_norm=bertadam_max_grad_norm)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)
    if name == "adafactor":
        return torch.optim.Adafactor(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; allowed: bertadam, adamw, adafactor")


def _cpu_adam(name: str, groups: list[dict], lr: float, betas, eps: float, max_grad_norm: float):
    """DeepSpeedCPUAdam computing ``name``'s update (BertAdam: no bias correction; AdamW: with it)."""
    if name not in ("bertadam", "adamw"):
        raise ValueError(f"ZeRO-Offload runs DeepSpeed's CPU Adam; {name!r} has no CPU counterpart (use bertadam or "
                         "adamw)")
    if max_grad_norm:
        raise ValueError("BertAdam's per-parameter clipping is not available with ZeRO-Offload (DeepSpeedCPUAdam "
                         "updates flat partitions)")
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=0.0,
                            bias_correction=name == "adamw", adamw_mode=True)


def linear_warmup_decay(optimizer: torch.optim.Optimizer, total_steps: int, warmup_proportion: float,
                        segments: Optional[Sequence[tuple[int, int]]] = None):
    """LambdaLR: in each segment [a, b) of the steps (default: one segment, all steps), the factor rises
    linearly from 0 to 1 over the segment's warm-up, then falls linearly to 0 at its end:

        n = b − a, W = ⌈warmup·n⌉, t = s − a;  factor = t / W for t < W, else max(0, (n − t) / (n − W)).

    Several segments restart the schedule, as when Teacher Intervention and KD-QAT are two trainings.
    """
    segments = list(segments) if segments else [(0, total_steps)]

    def factor(step: int) -> float:
        start, end = next(((a, b) for a, b in segments if a <= step < b), segments[-1])
        length, local = end - start, step - start
        warmup = math.ceil(warmup_proportion * length)
        if local < warmup:
            return local / warmup
        return max(0.0, (length - local) / max(1, length - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
