"""The frozen teacher of a KD-QAT stage, in the precision ``kdqat.model.teacher_precision`` asks for.

=====================  ==================================================================================
``teacher_precision``  the teacher the KD-QAT stage runs (P parameters, P_lin of them in ``nn.Linear`` weights)
=====================  ==================================================================================
``"fp32"`` (default)   weights and forward in float32: ``4·P`` bytes. Replicated on every rank, or under ZeRO-3
                       with ``kdqat.model.partition_teacher`` partitioned by an engine of its own, also in
                       float32 when the run trains in ``bf16``/``fp16`` (that engine is given neither).
``"bf16"``             weights and forward in bfloat16: ``2·P`` bytes (partitioned: its engine in DeepSpeed's
                       bf16 mode). The teacher's forward costs about half as much memory traffic; on a CPU
                       without native bf16 arithmetic (AVX512-BF16 / AMX) it can be slower than fp32.
``"int8_dynamic"``     PyTorch's dynamic int8 quantization of every ``nn.Linear``
                       (``torch.ao.quantization.quantize_dynamic``, qint8 weights with one scale per matrix,
                       each input quantized per call from its own min/max, float32 outputs): about
                       ``1·P_lin + 4·(P − P_lin)`` bytes. CPU only (fbgemm / x86 / oneDNN kernels) and never
                       partitioned (a quantized linear has no parameters for ZeRO-3 to shard).
=====================  ==================================================================================

What the student sees: every loss term compares the two models' taps in float32
(:meth:`ds_kdqat.distill.recipes.DistillObjective.term_value` casts both), and a Teacher-Intervention tensor is cast
to the student's dtype where it replaces the student's own (:mod:`ds_kdqat.models.attention`,
:mod:`ds_kdqat.models.taps`), so a cheaper teacher changes the targets' values only by its rounding, never the
dtype of the student's computation.

The teacher's own dev metrics in ``results.json`` (``teacher``, ``teacher_by_split``) are always the fp32
teacher's, the model the student is compared with; with another precision the KD teacher's are reported beside
them (``teacher_kd``, ``teacher_kd_by_split``; :mod:`ds_kdqat.pipeline`).
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
from torch import nn

from ds_kdqat.errors import ConfigError

TeacherPrecision = Literal["fp32", "bf16", "int8_dynamic"]
TEACHER_PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "int8_dynamic")
KEY = "kdqat.model.teacher_precision"

# the ds_config keys a partitioned teacher's own engine takes from the run's (precision: see teacher_engine_config)
_ENGINE_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "zero_optimization")


def check_teacher_precision(precision: str, device_type: str, partitioned: bool) -> None:
    """ConfigError (naming :data:`KEY`) when ``precision`` cannot run where the teacher will: ``int8_dynamic`` on a
    non-CPU device (``device_type``, e.g. ``"cuda"``) or for a teacher partitioned under ZeRO-3."""
    if precision not in TEACHER_PRECISIONS:
        raise ConfigError(KEY, f"got {precision!r}; allowed: {', '.join(TEACHER_PRECISIONS)}")
    if precision != "int8_dynamic":
        return
    if partitioned:
        raise ConfigError(KEY, '"int8_dynamic" keeps the teacher\'s linears as packed int8 modules, which ZeRO-3 '
                          'cannot partition; set kdqat.model.partition_teacher to false (the teacher replicated on '
                          'every rank) or teacher_precision to "bf16"')
    if device_type != "cpu":
        raise ConfigError(KEY, f'"int8_dynamic" runs PyTorch\'s dynamic int8 kernels, which exist on the CPU only; '
                          f'this run is on {device_type}: set teacher_precision to "bf16" (or "fp32")')
    if not hasattr(torch.ao.quantization, "quantize_dynamic"):
        raise ConfigError(KEY, f'"int8_dynamic" needs torch.ao.quantization.quantize_dynamic, which PyTorch '
                          f'{torch.__version__} no longer has; set teacher_precision to "bf16" or "fp32"')


def teacher_engine_config(deepspeed: dict[str, Any], precision: str) -> dict[str, Any]:
    """The ds_config of a partitioned teacher's own engine: the run's batch and ZeRO keys, and bf16 exactly when
    ``precision`` is ``"bf16"`` (never the run's ``fp16``/``bf16``, so that ``"fp32"`` stays float32)."""
    config = {key: deepspeed[key] for key in _ENGINE_KEYS if key in deepspeed}
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    return config


def convert_teacher(teacher: nn.Module, precision: str) -> nn.Module:
    """``teacher`` (a frozen, replicated model on its device) in ``precision``; in place, returned.

    ``fp32``/``bf16``: floating parameters and buffers cast; ``int8_dynamic``: every ``nn.Linear`` (exactly that
    type, as ``quantize_dynamic`` maps them) replaced by ``torch.ao.nn.quantized.dynamic.Linear``.
    """
    if precision == "fp32":
        return teacher.float()
    if precision == "bf16":
        return teacher.to(torch.bfloat16)
    if precision == "int8_dynamic":
        with warnings.catch_warnings():  # PyTorch announces the eager-mode quantization API's eventual removal
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.ao.quantization.quantize_dynamic(teacher.float(), {nn.Linear}, dtype=torch.qint8,
                                                          inplace=True)
    raise ConfigError(KEY, f"got {precision!r}; allowed: {', '.join(TEACHER_PRECISIONS)}")


def linear_weight_count(model: nn.Module) -> int:
    """Elements of the weights ``int8_dynamic`` quantizes: those of modules of type ``nn.Linear`` exactly."""
    return sum(module.weight.numel() for module in model.modules() if type(module) is nn.Linear)
