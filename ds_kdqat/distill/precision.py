"""Loss terms in fp32 whatever the dtype of the taps, without keeping fp32 copies of them for the backward.

Under DeepSpeed's bf16 (or fp16) mode the student's taps are half-precision tensors, and with
``kdqat.model.teacher_precision: "bf16"`` so are the teacher's. Every KD term is nevertheless computed in
float32 (:meth:`ds_kdqat.distill.recipes.DistillObjective.term_value`):

* a float32 student tap: the loss runs on it as it is (the teacher's tap cast to float32 first when it is not):
  an fp32 run computes exactly what it always did;
* a half-precision student tap: :func:`fp32_term` runs the loss on float32 copies of both taps without
  recording a graph, and keeps only the two taps themselves (in their own dtype; the student's is usually kept
  alive by the model's graph anyway). Its backward recomputes the loss in float32 from them, with autograd, and
  returns ``∂loss/∂student`` cast to the student tap's dtype. So the loss and its gradient are the float32 ones,
  and the backward holds no float32 copies of the (B, H, S, S) maps and scores, where casting them in the
  forward would keep several per term and layer (about 1 GiB more at BERT-Large, bf16, micro batch 16). The
  price is one more evaluation of the (elementwise) loss in the backward. The teacher's tap is a target: no
  gradient flows into it. This path is differentiable once (a Hessian of a bf16 student's KD loss, which needs
  ``create_graph=True``, is refused with PyTorch's error for once-differentiable functions).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.autograd.function import once_differentiable

Tensor = torch.Tensor


def float32(tensor: Optional[Tensor]) -> Optional[Tensor]:
    """``tensor`` as float32 (itself when it already is, is not floating point, or is None); differentiable."""
    if tensor is None or not tensor.is_floating_point() or tensor.dtype == torch.float32:
        return tensor
    return tensor.float()


class _Fp32Term(torch.autograd.Function):
    """``loss(float32(student), float32(teacher))``, saving only ``student`` and ``teacher`` (module docstring)."""

    @staticmethod
    def forward(ctx, loss: Callable, student: Tensor, teacher: Optional[Tensor]) -> Tensor:
        ctx.loss = loss
        ctx.save_for_backward(student)
        ctx.teacher = teacher  # a target without gradient (perhaps made under inference_mode, which cannot be saved)
        with torch.no_grad():
            return loss(float32(student), float32(teacher)).detach()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        (student,), teacher = ctx.saved_tensors, ctx.teacher
        with torch.enable_grad():
            copy = student.detach().float().requires_grad_(True)
            value = ctx.loss(copy, float32(teacher.detach()) if teacher is not None else None)
            (grad,) = torch.autograd.grad(value, copy, grad_output)
        return None, grad.to(student.dtype), None


def fp32_term(loss: Callable[[Tensor, Optional[Tensor]], Tensor], student: Tensor,
              teacher: Optional[Tensor]) -> Tensor:
    """``loss(student, teacher)`` computed in float32 (a float32 scalar): directly when ``student`` is float32 or
    needs no gradient (``teacher`` cast when it is not float32), else through the recomputing function of the
    module docstring."""
    if student is None or student.dtype == torch.float32 or not student.is_floating_point() \
            or not (student.requires_grad and torch.is_grad_enabled()):
        return loss(float32(student), float32(teacher))
    return _Fp32Term.apply(loss, student, teacher)
