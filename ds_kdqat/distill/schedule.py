"""Training phases: Teacher Intervention (TI-O / TI-M) then KD-QAT, within a budget of the base schedule.

The plan of a run with ``base_steps`` steps in its base schedule (e.g. 3 epochs of the task, TernaryBERT's
budget "O"):

* total = round(budget × base_steps) (halves round up; at least 1);
* non-TI recipes: one ``kd`` phase of all the steps;
* ``ti_output`` / ``ti_map``: a TI step of round(ti.step_fraction × total) steps in ``ti_output`` (TI-O)
  or ``ti_map`` (TI-M), then ``kd`` for the rest, continuing from the intervened student;
* ``ti_gradual``: the TI step is ``ti_output`` for round(ti.output_fraction × TI steps), then ``ti_map``.

With ``distill.stages`` (recipe ``custom``) the KD step is cut into ``kd_stage1``, ``kd_stage2``, … of
round(fraction × total) steps each, the last taking the rest; each stage has its own terms (TernaryBERT's
SQuAD schedule: the Transformer-layer terms, then those plus the prediction term).

Phases with no step are left out. During a TI phase the student is trained with the same objective as in
``kd`` (``ti.kd_recipe``): this follows the paper, whose TI step keeps the baseline's KD losses
(prediction, layer outputs, attention) while the teacher's tensors are written into the student's forward.
The student's own tensors at an intervened point are still recorded, so e.g. the attention-score or map
term keeps training Q and K under TI-M, and the attention terms train the MHA sub-layer under TI-O
(whose output no longer reaches the rest of the network).

The paper runs the TI step and the KD step as two trainings (the KD step has its own learning-rate
schedule); :attr:`PhaseSpan.start` lets the engine restart its schedule at a phase boundary if it wants to.
A stage without a teacher (fine-tuning) has one ``supervised`` span; it is never part of a plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Protocol, Sequence, TypeVar

from ds_kdqat.models.taps import EncoderTaps, Interventions

from .config import DistillConfig, budget_multiplier

PhaseName = Literal["ti_output", "ti_map", "kd", "supervised"]  # or a stage: kd_stage1, kd_stage2, …
STAGE_PREFIX = "kd_stage"

# Phase -> the teacher tap its interventions are built from.
INTERVENTION_TAPS: dict[str, frozenset[str]] = {
    "ti_output": frozenset({"mha_outputs"}),
    "ti_map": frozenset({"attention_maps"}),
    "kd": frozenset(),
}


@dataclass(frozen=True)
class PhaseSpan:
    """Steps ``start`` (inclusive) to ``end`` (exclusive) of one phase; steps are 0-based."""

    phase: PhaseName
    start: int
    end: int

    @property
    def steps(self) -> int:
        return self.end - self.start


class _Spanned(Protocol):
    start: int
    end: int


S = TypeVar("S", bound=_Spanned)


def find_span(spans: Sequence[S], step: int) -> S:
    """The first of ``spans`` (anything with 0-based ``start``/``end``: a :class:`PhaseSpan`, a phase built
    on one) with ``start <= step < end``; ValueError when none holds ``step``."""
    for span in spans:
        if span.start <= step < span.end:
            return span
    raise ValueError(f"no span holds step {step}")


@dataclass(frozen=True)
class TrainingPlan:
    phases: tuple[PhaseSpan, ...]
    total_steps: int

    def span_at(self, step: int) -> PhaseSpan:
        """The span of 0-based ``step``."""
        if not 0 <= step < self.total_steps:
            raise ValueError(f"step {step} is outside the plan's steps 0..{self.total_steps - 1}")
        return find_span(self.phases, step)

    def phase_at(self, step: int) -> PhaseName:
        """The phase of 0-based ``step``."""
        return self.span_at(step).phase


def stage_phase(index: int) -> str:
    """The phase name of 0-based stage ``index`` of ``distill.stages``: ``kd_stage1``, …"""
    return f"{STAGE_PREFIX}{index + 1}"


def stage_index(phase: str) -> Optional[int]:
    """The 0-based stage index of a ``kd_stage<n>`` phase; None for any other phase."""
    suffix = phase[len(STAGE_PREFIX):] if phase.startswith(STAGE_PREFIX) else ""
    return int(suffix) - 1 if suffix.isdigit() else None


def is_kd_phase(phase: str) -> bool:
    """A phase without Teacher Intervention: ``kd`` or a stage of ``distill.stages``."""
    return phase == "kd" or stage_index(phase) is not None


def _round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


def plan_training(config: DistillConfig, base_steps: int) -> TrainingPlan:
    """The phases of ``config`` for a base schedule of ``base_steps`` steps (see the module docstring)."""
    if not isinstance(base_steps, int) or base_steps < 1:
        raise ValueError(f"base_steps must be a positive integer, got {base_steps!r}")
    config.validate()
    total = max(1, _round_half_up(budget_multiplier(config.budget) * base_steps))
    lengths: list[tuple[PhaseName, int]] = []
    if config.is_teacher_intervention:
        ti_steps = _round_half_up(config.ti.step_fraction * total)
        if config.recipe == "ti_gradual":
            output_steps = _round_half_up(config.ti.output_fraction * ti_steps)
            lengths += [("ti_output", output_steps), ("ti_map", ti_steps - output_steps)]
        else:
            lengths.append(("ti_output" if config.recipe == "ti_output" else "ti_map", ti_steps))
        lengths.append(("kd", total - ti_steps))
    elif config.stages:
        for index, stage in enumerate(config.stages[:-1]):
            lengths.append((stage_phase(index), _round_half_up(stage.fraction * total)))
        lengths.append((stage_phase(len(config.stages) - 1), max(0, total - sum(n for _, n in lengths))))
    else:
        lengths.append(("kd", total))
    spans, start = [], 0
    for phase, steps in lengths:
        if steps > 0:
            spans.append(PhaseSpan(phase, start, start + steps))
            start += steps
    return TrainingPlan(tuple(spans), total)


def _usable(tensor):
    """Detached; a tensor made under ``torch.inference_mode`` is cloned, since autograd may save it for backward
    (e.g. the teacher map in map·V)."""
    tensor = tensor.detach()
    return tensor.clone() if tensor.is_inference() else tensor


def build_interventions(phase: PhaseName, teacher: EncoderTaps,
                        layers: Optional[Sequence[int]] = None) -> Optional[Interventions]:
    """The interventions of ``phase`` from the teacher's taps of the same batch (None for ``kd``).

    ``ti_output``: the teacher's MHA outputs replace the student's (TI-O); ``ti_map``: the teacher's
    attention maps replace the student's (TI-M). ``layers``: the layers to intervene (None = all).
    The teacher may run under ``torch.no_grad()`` or ``torch.inference_mode()``.
    """
    if is_kd_phase(phase):
        return None
    if phase not in INTERVENTION_TAPS:
        raise ValueError(f"unknown phase {phase!r}; known: {', '.join(INTERVENTION_TAPS)}")
    (tap,) = INTERVENTION_TAPS[phase]
    source = getattr(teacher, tap)
    chosen = range(len(source)) if layers is None else layers
    tensors = {l: _usable(teacher.get(tap, l)) for l in chosen}
    if phase == "ti_output":
        return Interventions(mha_outputs=tensors)
    return Interventions(attention_maps=tensors)


def teacher_record(required_taps: frozenset[str], record_layers: Sequence[int], phase: PhaseName,
                   intervene_layers: Sequence[int]) -> tuple[frozenset[str], tuple[int, ...]]:
    """(tap names, layers) the teacher forward must record for the objective plus the phase's interventions."""
    kd = is_kd_phase(phase)
    names = frozenset(required_taps) | (frozenset() if kd else INTERVENTION_TAPS[phase])
    layers = set(record_layers) | (set(intervene_layers) if not kd else set())
    return names, tuple(sorted(layers))
