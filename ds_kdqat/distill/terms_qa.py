"""Loss terms of extractive question answering (task kind ``qa``): the student's span logits against the
teacher's (``span_pred``) or against the gold positions (``span_ground_truth``).

The ``logits`` tap of a QA model is (B, S, 2): start and end logits per token
(:func:`ds_kdqat.models.taps.output_logits`); padded tokens are no positions.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import losses
from .terms import TermContext, register_term

Tensor = torch.Tensor


def _need_spans(student: Optional[Tensor], name: str) -> None:
    if student is None or student.dim() != 3 or student.shape[-1] != 2:
        shape = None if student is None else tuple(student.shape)
        raise ValueError(f"term {name!r} needs (B, S, 2) start/end logits of a question-answering model; got {shape}")


@register_term("span_pred", tap="logits", padding="softmax over real tokens (padded positions left out)")
def span_pred(student: Optional[Tensor], teacher: Optional[Tensor], ctx: TermContext) -> Tensor:
    """Soft cross-entropy (τ) of the start and of the end distributions with the teacher's, their mean."""
    _need_spans(student, "span_pred")
    return losses.span_soft_cross_entropy(student, teacher, ctx.temperature, ctx.attention_mask)


@register_term("span_ground_truth", tap="logits", padding="softmax over real tokens", needs_labels=True)
def span_ground_truth(student: Optional[Tensor], teacher: Optional[Tensor], ctx: TermContext) -> Tensor:
    """Cross-entropy of the start and end logits against the gold positions, their mean; the teacher is unused."""
    _need_spans(student, "span_ground_truth")
    return losses.span_cross_entropy(student, ctx.labels, ctx.attention_mask)
