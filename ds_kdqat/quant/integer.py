"""The quantized linear's training forward on integer GEMMs (``kdqat.quant.integer_forward``).

The fake-quant forward computes ``x̂·ŵᵀ`` as an fp32 GEMM of the fake-quantized tensors. Their codes are
integers, so the same product is ``a_x·a_w·(Q_x·Q_wᵀ) + b_x·a_w·ΣQ_w``, with ``Q_x·Q_wᵀ`` an int8 × int8 → int32
GEMM (:func:`ds_kdqat.deploy.int_ops.int_linear`, the int8 deployment backend's own arithmetic): exact sums
where the fp32 GEMM rounds, so outputs differ from the fake-quant forward by float rounding only, and the
trained student computes what the int8 backend computes. The backward is the fake-quant one: ``∂L/∂x̂ = g·ŵ``,
``∂L/∂ŵ = gᵀ·x̂`` in float, with ``x̂``/``ŵ`` rebuilt from the saved codes and the straight-through estimate
to the latent tensors.

Which linears qualify (:func:`integer_form_of`): 8-bit-or-less activation codes (uniform min-max or
symmetric, LSQ) and weight codes without a shift (ternary, binary, symmetric uniform, up to 8 bits).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ds_kdqat.deploy.int_ops import IntTensor, int_linear
from ds_kdqat.quant.codes import Codes

INTEGER_FORWARD_DEVICES = ("cpu",)


def _per_row(t: torch.Tensor) -> torch.Tensor:
    """A scale of shape ``()`` or ``(rows, 1, …)`` as ``()`` or ``(rows,)``."""
    return t.reshape(()) if t.numel() == 1 and t.dim() <= 1 else t.reshape(t.shape[0])


def activation_int_form(codes: Codes, features: int) -> Optional[IntTensor]:
    """The int8 form of an activation's codes as ``(tokens, features)``, or None when it has none (codes wider
    than 8 bits, a per-row scale, a dropout factor)."""
    c = codes.codes
    if codes.factor is not None or codes.scale.numel() != 1:
        return None
    flat = c.reshape(-1, features)
    scale = codes.scale.reshape(()).float()
    if c.dtype == torch.uint8:  # min-max: x̂ = s·c + m = s·(c − 128) + (m + 128·s)
        if codes.offset is None:
            return None
        q = torch.bitwise_xor(flat, 128).view(torch.int8)  # c − 128 in two's complement
        return IntTensor(q, scale, codes.offset.reshape(()).float() + 128 * scale)
    if c.dtype != torch.int8 or codes.offset is not None:
        return None
    return IntTensor(flat, 1.0 / scale if codes.divide else scale)


def weight_int_form(codes: Codes) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(Q_wᵀ (K, N) int8, a_w () or (N,), Σ_k Q_w (N,) float32)`` of a weight's codes, or None when the weight
    has no shift-free int8 form."""
    if codes.codes.dtype != torch.int8 or codes.offset is not None or codes.factor is not None:
        return None
    scale = _per_row(codes.scale).float()
    if codes.divide:
        scale = 1.0 / scale
    q = codes.codes
    return q.t(), scale, q.sum(dim=1, dtype=torch.int32).float()


class _IntegerLinear(torch.autograd.Function):
    """Forward: the integer GEMM of the codes; backward: the float fake-quant gradients (see the module doc)."""

    @staticmethod
    def forward(ctx, x_st, w_st, bias, x_codes: Codes, w_codes: Codes, x_int: IntTensor, w_form):  # type: ignore[override]
        # the integer tensors (a quarter of the fp32 copies or less) go through save_for_backward, so that outer
        # saved-tensor hooks (activation checkpointing, memory traces) see them; the scales ride along
        ctx.save_for_backward(x_codes.codes, w_codes.codes)
        ctx.x_codes, ctx.w_codes = _without_tensor(x_codes), _without_tensor(w_codes)
        ctx.shape = x_st.shape
        ctx.has_bias = bias is not None
        w_t, w_scale, w_sums = w_form
        out = int_linear(x_int, w_t, w_scale, None, w_sums, bias)
        return out.to(x_st.dtype).reshape(*x_st.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x_q, w_q = ctx.saved_tensors
        grad2 = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad2.mm(dataclasses.replace(ctx.w_codes, codes=w_q).values()).reshape(ctx.shape)
        if ctx.needs_input_grad[1]:
            x_hat = dataclasses.replace(ctx.x_codes, codes=x_q).values()
            grad_w = grad2.t().mm(x_hat.reshape(-1, ctx.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad2.sum(0)
        return grad_x, grad_w, grad_b, None, None, None, None


def _without_tensor(codes: Codes) -> Codes:
    """``codes`` with its integer tensor left out (an empty placeholder): the tensor is saved separately."""
    return dataclasses.replace(codes, codes=codes.codes.new_empty(0))


def integer_linear(x_st: torch.Tensor, w_st: torch.Tensor, bias: Optional[torch.Tensor], x_codes: Codes,
                   w_codes: Codes) -> Optional[torch.Tensor]:
    """``x̂·ŵᵀ + bias`` on the int8 GEMM, differentiable like ``F.linear(x̂, ŵ, bias)``; ``x_st``/``w_st`` are
    the fake-quantized tensors with their straight-through gradients, ``x_codes``/``w_codes`` their codes. None
    when either has no int8 form (the caller then runs the float product)."""
    if x_st.device.type not in INTEGER_FORWARD_DEVICES:
        raise RuntimeError(f"kdqat.quant.integer_forward runs on the CPU only (torch._int_mm); the model is on "
                           f"{x_st.device.type}: set it to false")
    x_int = activation_int_form(x_codes, x_st.shape[-1])
    w_form = weight_int_form(w_codes)
    if x_int is None or w_form is None:
        return None
    return _IntegerLinear.apply(x_st, w_st, bias, x_codes, w_codes, x_int, w_form)
