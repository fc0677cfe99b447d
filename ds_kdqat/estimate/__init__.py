"""Will it fit? Per-rank memory of a KD-QAT run before it is started (``ds-kdqat estimate``).

* :mod:`.shape`: the model (HF config from a folder, hub id, the packaged model, or shape flags) and its exact
  parameter counts, taken from the task model built and quantized on the meta device;
* :mod:`.trace`: activations, quantized weight copies and taps of one step, counted on narrow proxies of the
  model running the real step and extrapolated exactly;
* :mod:`.memory`: the parts per ZeRO stage, offload and precision, the phases and their peak, the largest micro
  batch that fits, and recommendations;
* :mod:`.report`: the table and the JSON.

``estimate_run(run, ...)`` does all of it for a loaded ds_config.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional

from ..errors import ConfigError
from .memory import (CPU_PROCESS_OVERHEAD, CUDA_CONTEXT, Estimate, Recommendation, Settings, estimate_memory,
                     largest_micro_batch, recommendations, settings_from_run)
from .shape import ModelShape, ShapeFlags, config_from_shape, model_shape, resolve_config
from .trace import ActivationModel, fit_activations

__all__ = ["ActivationModel", "CPU_PROCESS_OVERHEAD", "CUDA_CONTEXT", "Estimate", "ModelShape", "Recommendation",
           "RunEstimate", "Settings", "ShapeFlags", "config_from_shape", "estimate_memory", "estimate_run",
           "fit_activations", "largest_micro_batch", "model_shape", "parse_size", "recommendations",
           "resolve_config", "settings_from_run"]

_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 10**3, "m": 2**20, "mib": 2**20, "mb": 10**6,
          "g": 2**30, "gib": 2**30, "gb": 10**9, "t": 2**40, "tib": 2**40, "tb": 10**12}


def parse_size(text: str, flag: str = "--gpu_memory") -> int:
    """``"48GiB"`` → 51539607552, ``"80GB"`` → 80·10⁹ (GiB/MiB/KiB and the bare G/M/K are powers of 2; GB, MB,
    KB powers of 10), a plain number is bytes. ConfigError naming ``flag`` when it is not a size."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise ConfigError(flag, f"got {text!r}; expected a size such as 48GiB, 80GB or 24000MiB")
    value = float(match.group(1)) * _UNITS[unit]
    if value <= 0:
        raise ConfigError(flag, f"got {text!r}; must be > 0")
    return int(value)


@dataclass
class RunEstimate:
    """Everything ``ds-kdqat estimate`` prints: the estimate at the configured micro batch, the largest micro
    batch in the budget and, when the configured one does not fit, the recommendations."""

    model: ModelShape
    model_source: str
    estimate: Estimate
    budget: Optional[int]
    max_micro_batch: Optional[int]
    recommendations: list[Recommendation] = field(default_factory=list)
    inputs: dict[str, Any] = field(default_factory=dict)

    @property
    def fits(self) -> Optional[bool]:
        return None if self.budget is None else self.estimate.per_rank_total_bytes <= self.budget


def estimate_run(run, world_size: int = 1, device: str = "cuda", gpu_memory: Optional[int] = None,
                 shape_flags: Optional[ShapeFlags] = None, model: Optional[str] = None, seq: Optional[int] = None,
                 activation_checkpointing: Optional[bool] = None) -> RunEstimate:
    """The :class:`RunEstimate` of the loaded ds_config ``run`` (a :class:`~ds_kdqat.config.RunConfig`).

    The model is ``shape_flags`` when given, else ``model`` (a folder, hub id or ``embedded:…``), else the
    config's ``kdqat.model.teacher``. ``seq`` overrides ``kdqat.data.max_seq_length``;
    ``activation_checkpointing`` (None: the config's ``kdqat.train.activation_checkpointing``).
    """
    from ..data.description import task_spec

    if not isinstance(world_size, int) or world_size < 1:
        raise ConfigError("--world_size", f"got {world_size!r}; must be a positive integer")
    if device not in ("cuda", "cpu"):
        raise ConfigError("--device", f"got {device!r}; allowed: cuda, cpu")
    if seq is not None and (not isinstance(seq, int) or seq < 2):
        raise ConfigError("--seq", f"got {seq!r}; must be an integer >= 2")
    cfg = run.kdqat
    spec = task_spec(cfg.data)
    task_type = "qa" if spec.is_qa else "regression" if spec.is_regression else "classification"
    num_labels = 1 if spec.is_regression else max(2, len(spec.labels or ()))
    length = seq if seq is not None else cfg.data.max_seq_length
    if shape_flags is not None:
        config = config_from_shape(shape_flags, length)
        source = (f"--family {shape_flags.family} --layers {shape_flags.layers} --hidden {shape_flags.hidden} "
                  f"--heads {shape_flags.heads} --ffn {shape_flags.ffn} --vocab {shape_flags.vocab}")
    else:
        name = model or cfg.model.teacher
        key = "--model" if model else "kdqat.model.teacher"
        config = resolve_config(name, cfg.model.local_files_only, key, cfg.model.init_config if not model else None)
        source = name
    settings = settings_from_run(run, world_size, device, length, activation_checkpointing)
    shape = model_shape(config, length, cfg.quant, num_labels, task_type, world_size, settings.persistence_threshold)
    if not shape.pixels and hasattr(config, "max_position_embeddings") and shape.family != "t5":
        limit = int(config.max_position_embeddings) - (2 if config.model_type == "roberta" else 0)
        if length > limit:
            raise ConfigError("--seq" if seq is not None else "kdqat.data.max_seq_length",
                              f"got {length}; the model takes at most {limit} positions")
    settings = replace(settings, seq=shape.seq)
    acts = fit_activations(shape.config, shape.family, shape.pixels, shape.seq, cfg.distill, cfg.quant, task_type,
                           num_labels, settings.dtype_name, settings.teacher_dtype)
    estimate = estimate_memory(shape, acts, settings)
    best = recs = None
    if gpu_memory is not None:
        best = largest_micro_batch(shape, acts, settings, gpu_memory)
        recs = [] if estimate.per_rank_total_bytes <= gpu_memory else recommendations(shape, acts, settings,
                                                                                     gpu_memory)
    inputs = {"ds_config": run.source, "model": source, "world_size": world_size, "device": device,
              "gpu_memory_bytes": gpu_memory, "seq": shape.seq, "micro_batch": settings.micro_batch,
              "gradient_accumulation_steps": settings.accumulation, "zero_stage": settings.stage,
              "precision": settings.precision, "offload_optimizer": settings.offload_optimizer,
              "offload_param": settings.offload_param, "optimizer": settings.optimizer,
              "partition_teacher": settings.partition_teacher, "teacher_precision": settings.teacher_precision,
              "activation_checkpointing": settings.activation_checkpointing,
              "recipe": cfg.distill.recipe, "quant_preset": cfg.quant.preset, "task_type": task_type}
    return RunEstimate(shape, source, estimate, gpu_memory, best, recs or [], inputs)
