"""The forward half of one training step: teacher, interventions, student, objective → (loss, terms).

The same function serves the DeepSpeed engine's micro step, the step benchmark and the evidence tests;
what follows it (``backward``, the optimizer step) is the caller's.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
from torch import nn

from ds_kdqat.models.taps import forward_with_taps

from .phases import Phase


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` without its ``labels``: what the model's forward takes."""
    return {k: v for k, v in batch.items() if k != "labels"}


def kd_forward(teacher: Optional[nn.Module], student: nn.Module, batch: Mapping[str, torch.Tensor], phase: Phase,
               teacher_context: Callable = torch.no_grad,
               mark: Optional[Callable[[str], None]] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward ``teacher`` (if any) and ``student`` on ``batch`` under ``phase``; return ``(loss, terms)``.

    ``batch``: ``input_ids``/``attention_mask``/``token_type_ids`` (B, S) on the models' device and, when
    the objective needs them, ``labels`` (B,). The teacher runs under ``teacher_context()`` (``torch.no_grad``
    or ``torch.inference_mode``) recording ``phase.teacher_record``; the phase's interventions are built from
    its taps; the student (a module or a DeepSpeed engine) records ``phase.record`` with them in place.
    ``loss``: the objective's scalar (with its graph); ``terms``: each logged term, detached.

    Both forwards' taps are dropped before returning, so the teacher's tensors are freed before the caller's
    backward peaks; the loss graph keeps what backward needs. ``mark(name)``, when given, is called after
    each part (``teacher_forward``, ``student_forward``, ``losses``), e.g. to time them.
    """
    inputs, labels = model_inputs(batch), batch.get("labels")
    teacher_taps = None
    interventions = None
    if teacher is not None:
        with teacher_context():
            teacher_taps = forward_with_taps(teacher, inputs, record=phase.teacher_record,
                                             layers=phase.teacher_layers)
        if phase.interventions is not None:
            interventions = phase.interventions(teacher_taps)
    _mark(mark, "teacher_forward")
    student_taps = forward_with_taps(student, inputs, record=phase.record, layers=phase.record_layers,
                                     interventions=interventions)
    _mark(mark, "student_forward")
    loss, terms = phase.objective(student_taps, teacher_taps, labels)
    del student_taps, teacher_taps, interventions
    _mark(mark, "losses")
    return loss, terms


def _mark(mark: Optional[Callable[[str], None]], name: str) -> None:
    if mark is not None:
        mark(name)
