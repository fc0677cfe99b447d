"""The phases of a training stage: what each step minimises, what each forward records, which teacher
tensors replace the student's.

A :class:`Phase` is a :class:`~ds_kdqat.distill.schedule.PhaseSpan` (its name and steps) plus what the
step needs to run it. :func:`kd_phases` builds the KD-QAT stage's phases from the distillation config
(Teacher Intervention, then plain KD-QAT) as a :class:`KdPhases` list, which also knows how to move its phases
when a TI phase ends early (``ti.convergence``); :func:`supervised_phases` the single phase of a fine-tuning
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

from .config import ConvergenceConfig, DistillConfig
from .losses import ground_truth_cross_entropy, ground_truth_mse, span_cross_entropy
from .precision import float32
from .recipes import build_objective
from .schedule import (PhaseSpan, build_interventions, find_span, is_kd_phase, is_ti_phase, lr_segments,
                       plan_training, replan, stage_index, teacher_record)

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
    tensors in this phase, or None; ``intervene_layers``: the layers it intervenes (empty for KD phases).
    """

    span: PhaseSpan
    objective: Objective
    record: frozenset = frozenset()
    record_layers: Optional[tuple] = None
    teacher_record: frozenset = frozenset()
    teacher_layers: Optional[tuple] = None
    interventions: Optional[Callable[[EncoderTaps], Any]] = None
    intervene_layers: tuple = ()

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
    """Cross-entropy (classification) or MSE (regression) against the gold labels; used to fine-tune. Computed
    in fp32 (the logits are cast), as the KD terms are."""

    def __init__(self, regression: bool):
        self.regression = regression

    def __call__(self, student: EncoderTaps, teacher: Optional[EncoderTaps], labels: torch.Tensor):
        criterion = ground_truth_mse if self.regression else ground_truth_cross_entropy
        loss = criterion(float32(student.logits), labels)
        return loss, {"ground_truth": loss.detach(), "total": loss.detach()}


class SpanSupervisedObjective:
    """Extractive QA: the mean of the start and end cross-entropies against the gold positions (B, 2)."""

    def __call__(self, student: EncoderTaps, teacher: Optional[EncoderTaps], labels: torch.Tensor):
        loss = span_cross_entropy(float32(student.logits), labels, student.attention_mask)
        return loss, {"ground_truth": loss.detach(), "total": loss.detach()}


def supervised_phases(steps: int, regression: bool, qa: bool = False) -> list[Phase]:
    """The one phase of a fine-tuning stage of ``steps`` steps: the gold labels, no teacher, no taps
    (``qa``: span positions)."""
    objective = SpanSupervisedObjective() if qa else SupervisedObjective(regression)
    return [Phase(PhaseSpan(SUPERVISED, 0, steps), objective)]


def distill_phase(span: PhaseSpan, objective, intervene_layers: Sequence[int]) -> Phase:
    """The phase of ``span`` under a distillation ``objective``; TI phases intervene ``intervene_layers``."""
    names, layers = teacher_record(objective.required_taps, objective.record_layers, span.phase, intervene_layers)
    kd = is_kd_phase(span.phase)
    interventions = partial(build_interventions, span.phase, layers=intervene_layers) if not kd else None
    return Phase(span, objective, record=objective.required_taps, record_layers=objective.record_layers,
                 teacher_record=names, teacher_layers=layers, interventions=interventions,
                 intervene_layers=() if kd else tuple(intervene_layers))


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


class KdPhases(list):
    """The phases of a KD-QAT stage, in step order (a list of :class:`Phase`), and where TI phases ended early.

    ``planned``: the spans of the plan; ``ended``: {TI phase: the step it ended at} (only phases that ended
    before their planned end); ``convergence``: the config of the early end (None: phases never end early).
    :meth:`end_early` records an early end and rebuilds the list in place (:func:`~.schedule.replan`), so a
    loop that looks phases up by step sees the new plan at once; :meth:`state_dict`/:meth:`load_state_dict`
    carry ``ended`` through checkpoints.
    """

    def __init__(self, phases: Sequence[Phase], planned: Sequence[PhaseSpan], templates: dict[str, Phase],
                 convergence: Optional[ConvergenceConfig] = None):
        super().__init__(phases)
        self.planned = tuple(planned)
        self.templates = dict(templates)  # phase name -> a Phase of that name (its span is replaced)
        self.convergence = convergence if convergence is not None and convergence.enabled else None
        self.ended: dict[str, int] = {}
        self.planned_total = self.planned[-1].end if self.planned else 0

    @property
    def total_steps(self) -> int:
        """Steps of the stage under the current plan."""
        return self[-1].end if self else 0

    @property
    def segments(self) -> Optional[list[tuple[int, int]]]:
        """The learning-rate segments of the current plan (:func:`~.schedule.lr_segments`)."""
        return lr_segments([phase.span for phase in self], self.total_steps)

    def end_early(self, phase: str, step: int) -> None:
        """TI phase ``phase`` ends at ``step`` (exclusive) instead of its current end; the list is rebuilt."""
        if self.convergence is None:
            raise ValueError("this stage's phases do not end early (ti.convergence.enabled is false)")
        if not is_ti_phase(phase):
            raise ValueError(f"only Teacher-Intervention phases end early, not {phase!r}")
        self._apply({**self.ended, phase: step})

    def _apply(self, ended: dict[str, int]) -> None:
        plan = replan(self.planned, ended, self.convergence.unused_steps if self.convergence else "drop")
        self[:] = [dataclasses.replace(self.templates[span.phase], span=span) for span in plan.phases]
        self.ended = dict(ended)

    def state_dict(self) -> dict:
        """``{"ended": {phase: step}}``: what :meth:`load_state_dict` needs to rebuild the same phases."""
        return {"ended": dict(self.ended)}

    def load_state_dict(self, state: dict) -> None:
        ended = {str(k): int(v) for k, v in (state or {}).get("ended", {}).items()}
        if ended and self.convergence is None:
            raise ValueError(f"the checkpoint has TI phases that ended early ({ended}) but ti.convergence is off")
        self._apply(ended)


def kd_phases(config: DistillConfig, base_steps: int, num_layers: int, task_type: str,
              steps_per_epoch: Optional[int] = None) -> tuple[KdPhases, Optional[list[tuple[int, int]]]]:
    """The KD-QAT stage's phases from the distillation config (Teacher Intervention, then KD-QAT) and the
    learning-rate segments: the TI step and the KD step each get their own warm-up and decay, as two
    trainings do in the Teacher Intervention paper (None when there is one phase kind only).

    ``steps_per_epoch``: optimizer steps per epoch of the training data, for the TI step's cap
    (``ti.max_epochs``; see :mod:`ds_kdqat.distill.schedule`). Each TI phase's objective is the KD objective
    plus the phase's internal term (:func:`~ds_kdqat.distill.recipes.build_objective` with ``phase``)."""
    plan = plan_training(config, base_steps, steps_per_epoch)
    intervene = config.ti.layers.resolve(num_layers) if config.is_teacher_intervention else ()
    objectives: dict[str, Any] = {}

    def objective_of(phase: str):
        if phase not in objectives:
            if config.stages:
                objectives[phase] = stage_objective(config, stage_index(phase), num_layers, task_type)
            else:
                objectives[phase] = build_objective(config, num_layers, task_type,
                                                    phase=None if is_kd_phase(phase) else phase)
        return objectives[phase]

    phases = [distill_phase(span, objective_of(span.phase), intervene) for span in plan.phases]
    templates = {phase.name: phase for phase in phases}
    if config.is_teacher_intervention and "kd" not in templates:  # an early end may need a KD phase
        templates["kd"] = distill_phase(PhaseSpan("kd", 0, 0), objective_of("kd"), intervene)
    if task_type == "qa":
        _check_qa_terms(phases)
    stage = KdPhases(phases, plan.phases, templates,
                     config.ti.convergence if config.is_teacher_intervention else None)
    return stage, lr_segments(plan.phases, plan.total_steps)
