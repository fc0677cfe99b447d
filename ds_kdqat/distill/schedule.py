"""Training phases: Teacher Intervention (TI-O / TI-M) then KD-QAT, within a budget of the base schedule.

The plan of a run with ``base_steps`` steps in its base schedule (e.g. 3 epochs of the task, TernaryBERT's
budget "O") and ``steps_per_epoch`` optimizer steps per epoch of the training data:

* total = round(budget × base_steps) (halves round up; at least 1);
* non-TI recipes: one ``kd`` phase of all the steps;
* ``ti_output`` / ``ti_map``: a TI step in ``ti_output`` (TI-O) or ``ti_map`` (TI-M), then ``kd`` for the rest,
  continuing from the intervened student. The TI step is ``ti.steps`` steps when given, else
  round(``ti.step_fraction`` × total), and at most ⌊``ti.max_epochs`` × steps_per_epoch⌋ (default: one epoch,
  the paper's "until convergence (up to one epoch)"; ``max_epochs: null`` lifts the cap; without
  ``steps_per_epoch`` — a library caller that has no data — there is no cap);
* ``ti_gradual``: the TI step is ``ti_output`` for round(ti.output_fraction × TI steps), then ``ti_map``.

With ``distill.stages`` (recipe ``custom``) the KD step is cut into ``kd_stage1``, ``kd_stage2``, … of
round(fraction × total) steps each, the last taking the rest; each stage has its own terms (TernaryBERT's
SQuAD schedule: the Transformer-layer terms, then those plus the prediction term).

Phases with no step are left out. During a TI phase the student is trained with the same objective as in
``kd`` (``ti.kd_recipe``) plus the phase's internal term: this follows the paper, whose TI step keeps the
baseline's KD losses (prediction, layer outputs, attention) while the teacher's tensors are written into the
student's forward, and distils the intervened sub-layer internally. The student's own tensors at an intervened
point are still recorded, so the internal term (``ti_mha_output`` under TI-O, ``ti_attention_map`` under
TI-M; :mod:`ds_kdqat.distill.terms`) trains the part of the MHA sub-layer whose output no longer reaches the
rest of the network.

Early end (``ti.convergence``): a TI phase may end before its planned end when its loss plateaus
(:class:`PlateauCriterion`); :func:`replan` moves the following phases (``unused_steps``: ``"drop"`` keeps
their lengths and shortens the run, ``"kd"`` gives the steps to the KD-QAT step). The steps at which phases
ended are part of the training loop's checkpointed state, so a resumed run replans the same way.

The paper runs the TI step and the KD step as two trainings (the KD step has its own learning-rate
schedule); :func:`lr_segments` gives the engine those two segments.
A stage without a teacher (fine-tuning) has one ``supervised`` span; it is never part of a plan.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Literal, Mapping, Optional, Protocol, Sequence, TypeVar

from ds_kdqat.models.taps import EncoderTaps, Interventions

from .config import DEFAULT_TI_STEP_FRACTION, ConvergenceConfig, DistillConfig, budget_multiplier

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


def ti_step_length(config: DistillConfig, total: int, steps_per_epoch: Optional[int] = None) -> int:
    """Steps of the TI step of a run of ``total`` steps (see the module docstring); warns when the epoch cap
    shortens a length the config set explicitly (``ti.steps`` or a non-default ``ti.step_fraction``)."""
    ti = config.ti
    if ti.steps is not None and ti.steps > total:
        warnings.warn(f"ti.steps={ti.steps} is more than the run's {total} steps; the TI step takes them all "
                      "(no KD-QAT step)", UserWarning, stacklevel=3)
    wanted = min(ti.steps, total) if ti.steps is not None else _round_half_up(ti.step_fraction * total)
    if ti.max_epochs is None or steps_per_epoch is None:
        return wanted
    if not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be a positive integer, got {steps_per_epoch!r}")
    cap = max(1, int(math.floor(ti.max_epochs * steps_per_epoch + 1e-9)))
    if wanted > cap and (ti.steps is not None or ti.step_fraction != DEFAULT_TI_STEP_FRACTION):
        asked = f"ti.steps={ti.steps}" if ti.steps is not None else f"ti.step_fraction={ti.step_fraction:g}"
        warnings.warn(f"{asked} asks for a TI step of {wanted} steps; ti.max_epochs={ti.max_epochs:g} caps it at "
                      f"{cap} ({steps_per_epoch} steps per epoch). Set kdqat.distill.ti.max_epochs to null (or more) "
                      "to lift the cap", UserWarning, stacklevel=3)
    return min(wanted, cap)


def plan_training(config: DistillConfig, base_steps: int, steps_per_epoch: Optional[int] = None) -> TrainingPlan:
    """The phases of ``config`` for a base schedule of ``base_steps`` steps (see the module docstring);
    ``steps_per_epoch``: optimizer steps per epoch of the training data (for the TI step's cap)."""
    if not isinstance(base_steps, int) or base_steps < 1:
        raise ValueError(f"base_steps must be a positive integer, got {base_steps!r}")
    config.validate()
    total = max(1, _round_half_up(budget_multiplier(config.budget) * base_steps))
    lengths: list[tuple[PhaseName, int]] = []
    if config.is_teacher_intervention:
        ti_steps = ti_step_length(config, total, steps_per_epoch)
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


def is_ti_phase(phase: str) -> bool:
    """A Teacher-Intervention phase (``ti_output``, ``ti_map``)."""
    return phase in INTERVENTION_TAPS and not is_kd_phase(phase)


def replan(planned: Sequence[PhaseSpan], ended: Mapping[str, int],
           unused_steps: Literal["drop", "kd"] = "drop") -> TrainingPlan:
    """The plan after TI phases ended early: ``planned`` (the spans of :func:`plan_training`, in order) with
    phase ``p`` ending at step ``ended[p]`` (exclusive; within its moved span) instead of its planned end.

    Every other phase keeps its planned length and starts where the previous one ends; then ``unused_steps``:
    ``"drop"``: the total shrinks by the steps the ended phases did not use; ``"kd"``: the ``kd`` phase ends at
    the planned total (one is added after the last phase when the plan had none)."""
    if unused_steps not in ("drop", "kd"):
        raise ValueError(f"unused_steps must be 'drop' or 'kd', got {unused_steps!r}")
    names = [span.phase for span in planned]
    unknown = sorted(set(ended) - set(names))
    if unknown:
        raise ValueError(f"phases {unknown} ended early but are not in the plan {names}")
    planned_total = planned[-1].end if planned else 0
    spans, start = [], 0
    for span in planned:
        length = span.steps
        if span.phase in ended:
            if not is_ti_phase(span.phase):
                raise ValueError(f"only Teacher-Intervention phases end early, not {span.phase!r}")
            length = ended[span.phase] - start
            if not 0 < length <= span.steps:
                raise ValueError(f"phase {span.phase!r} cannot end at step {ended[span.phase]}: it starts at "
                                 f"{start} and has at most {span.steps} steps")
        if span.phase == "kd" and unused_steps == "kd":
            length = planned_total - start
        spans.append(PhaseSpan(span.phase, start, start + length))
        start += length
    if unused_steps == "kd" and start < planned_total:
        spans.append(PhaseSpan("kd", start, planned_total))
        start = planned_total
    return TrainingPlan(tuple(spans), start)


def lr_segments(spans: Sequence[PhaseSpan], total: int) -> Optional[list[tuple[int, int]]]:
    """The learning-rate segments: the TI step and the KD step each get their own warm-up and decay, as two
    trainings do in the Teacher Intervention paper (None when there is one phase kind only)."""
    kd_start = next((span.start for span in spans if span.phase == "kd"), total)
    return [(0, kd_start), (kd_start, total)] if 0 < kd_start < total else None


@dataclass
class PlateauCriterion:
    """The convergence test of one TI phase (:class:`~ds_kdqat.distill.config.ConvergenceConfig`), fed one
    loss per optimizer step; deterministic, and its whole state is :meth:`state_dict` (JSON: floats survive a
    round trip exactly), so a resumed run decides as an uninterrupted one.

    ``phase``: the phase whose losses ``losses`` holds (the last ``2·window``); ``steps``: the phase's steps fed.
    """

    config: ConvergenceConfig
    phase: Optional[str] = None
    steps: int = 0
    losses: list = field(default_factory=list)

    def update(self, phase: str, loss: float) -> bool:
        """Feed the loss of the next step of ``phase`` (a new phase starts afresh); True when the phase has
        plateaued after this step."""
        if phase != self.phase:
            self.phase, self.steps, self.losses = phase, 0, []
        window = self.config.window
        self.steps += 1
        self.losses = (self.losses + [float(loss)])[-2 * window:]
        if self.steps < self.config.first_check or len(self.losses) < 2 * window:
            return False
        before = sum(self.losses[:window]) / window
        after = sum(self.losses[window:]) / window
        if not math.isfinite(before) or not math.isfinite(after):
            return False
        improvement = (before - after) / max(abs(before), 1e-12)
        return improvement < self.config.threshold

    def state_dict(self) -> dict:
        return {"phase": self.phase, "steps": self.steps, "losses": list(self.losses)}

    def load_state_dict(self, state: dict) -> None:
        self.phase, self.steps, self.losses = state["phase"], int(state["steps"]), [float(x) for x in state["losses"]]


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
