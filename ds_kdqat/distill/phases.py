"""The phases of a training stage: what each step minimises, what each forward records, which teacher
tensors replace the student's.

A :class:`Phase` is a :class:`~ds_kdqat.distill.schedule.PhaseSpan` (its name and steps) plus what the
step needs to run it. :func:`kd_phases` builds the KD-QAT stage's phases from the distillation config
(Teacher Intervention, then plain KD-QAT); :func:`supervised_phases` the single phase of a fine-tuning
stage (no teacher). :func:`phase_at` is the lookup by step, the same as :meth:`TrainingPlan.span_at`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional, Protocol, Sequence

import torch

from ds_kdqat.errors import ConfigError
from ds_kdqat.models.taps import EncoderTaps

from .config import DistillConfig
from .losses import ground_truth_cross_entropy, ground_truth_mse, span_cross_entropy
from .recipes import build_objective
from .schedule import (PhaseSpan, build_interventions, find_span, is_kd_phase, plan_training, stage_index,
                       teacher_record)

SUPERVISED = "supervised"


class Objective(Protocol):
    """What a stage minimises; the taps each forward records are the :class:`Phase`'s business."""

    def __call__(self, student: EncoderTaps, teacher: Optional[EncoderTaps], labels: Optional[torch.Tensor]):
        """Return ``(loss, terms)``: the scalar to minimise and each logged term (detached)."""


@dataclass(frozen=True)
class Phase:
    """One span of a stage's steps with its objective, what each forward records, and the teacher
    interventions of the phase.

    ``record``/``record_layers``: tap names and layers the student forward records (None = all layers);
    ``teacher_record``/``teacher_layers``: the same for the teacher forward (the objective's taps plus what
    the interventions are built from); ``interventions(teacher_taps)`` returns what replaces the student's
    tensors in this phase, or None.
    """

    span: PhaseSpan
    objective: Objective
    record: frozenset = frozenset()
    record_layers: Optional[tuple] = None
    teacher_record: frozenset = frozenset()
    teacher_layers: Optional[tuple] = None
    interventions: Optional[Callable[[EncoderTaps], Any]] = None

    @property
    def name(self) -> str:
        return self.span.phase

    @property
    def start(self) -> int:
        return self.span.start

    @property
    def end(self) -> int:
        return self.span.end


def phase_at(phases: Sequence[Phase], step: int) -> Phase:
    """The phase of 0-based optimizer ``step`` (``phases`` in step order, as built here)."""
    return find_span(phases, step)


class SupervisedObjective:
    """Cross-entropy (classification) or MSE (regression) against the gold labels; used to fine-tune."""

    def __init__(self, regression: bool):
        self.regression = regression

    def __call__(self, student: EncoderTaps, teacher: Optional[EncoderTaps], labels: torch.Tensor):
        loss = (ground_truth_mse if self.regression else ground_truth_cross_entropy)(student.logits, labels)
        return loss, {"ground_truth": loss.detach(), "total": loss.detach()}


class SpanSupervisedObjective:
    """Extractive QA: the mean of the start and end cross-entropies against the gold positions (B, 2)."""

    def __call__(self, student: EncoderTaps, teacher: Optional[EncoderTaps], labels: torch.Tensor):
        loss = span_cross_entropy(student.logits, labels, student.attention_mask)
        return loss, {"ground_truth": loss.detach(), "total": loss.detach()}


def supervised_phases(steps: int, regression: bool, qa: bool = False) -> list[Phase]:
    """The one phase of a fine-tuning stage of ``steps`` steps: the gold labels, no teacher, no taps
    (``qa``: span positions)."""
    objective = SpanSupervisedObjective() if qa else SupervisedObjective(regression)
    return [Phase(PhaseSpan(SUPERVISED, 0, steps), objective)]


def distill_phase(span: PhaseSpan, objective, intervene_layers: Sequence[int]) -> Phase:
    """The phase of ``span`` under a distillation ``objective``; TI phases intervene ``intervene_layers``."""
    names, layers = teacher_record(objective.required_taps, objective.record_layers, span.phase, intervene_layers)
    interventions = (partial(build_interventions, span.phase, layers=intervene_layers)
                     if not is_kd_phase(span.phase) else None)
    return Phase(span, objective, record=objective.required_taps, record_layers=objective.record_layers,
                 teacher_record=names, teacher_layers=layers, interventions=interventions)


def _check_qa_terms(phases: Sequence[Phase]) -> None:
    """Extractive QA has span logits: the class-logit terms do not apply (their span counterparts do)."""
    for phase in phases:
        wrong = sorted({"pred", "ground_truth"} & set(getattr(phase.objective, "coefficients", {})))
        if wrong:
            raise ConfigError("kdqat.distill", f"terms {wrong} compare class logits; a question-answering task "
                                               "uses span_pred / span_ground_truth (recipe \"custom\" or stages)")


def stage_objective(config: DistillConfig, index: int, num_layers: int, task_type: str):
    """The objective of stage ``index`` of ``config.stages``: the config's with that stage's terms."""
    stage = dataclasses.replace(config, terms=list(config.stages[index].terms), stages=[])
    return build_objective(stage, num_layers, task_type, path=f"distill.stages[{index}]")


def kd_phases(config: DistillConfig, base_steps: int, num_layers: int,
              task_type: str) -> tuple[list[Phase], Optional[list[tuple[int, int]]]]:
    """The KD-QAT stage's phases from the distillation config (Teacher Intervention, then KD-QAT) and the
    learning-rate segments: the TI step and the KD step each get their own warm-up and decay, as two
    trainings do in the Teacher Intervention paper (None when there is one phase kind only)."""
    objective = build_objective(config, num_layers, task_type) if not config.stages else None
    plan = plan_training(config, base_steps)
    intervene = config.ti.layers.resolve(num_layers) if config.is_teacher_intervention else ()
    phases = [distill_phase(span, objective or stage_objective(config, stage_index(span.phase), num_layers,
                                                               task_type), intervene)
              for span in plan.phases]
    if task_type == "qa":
        _check_qa_terms(phases)
    kd_start = next((p.start for p in phases if p.name == "kd"), plan.total_steps)
    segments = [(0, kd_start), (kd_start, plan.total_steps)] if 0 < kd_start < plan.total_steps else None
    return phases, segments
