"""Integer forms of quantized tensors, and the int8 GEMM (pure functions).

Every quantized tensor the student uses is written here as ``x̂ = a·Q + b``: ``Q`` int8 codes, ``a`` a scale and
``b`` a shift, each a scalar (one per tensor) or one per row (dim 0). For a linear layer with
``x̂ = a_x·Q_x + b_x`` (M, K) and ``Ŵ = diag(a_w)·Q_w + b_w·1ᵀ`` (N, K):

    x̂·Ŵᵀ [m, n] = a_x·a_w[n]·(Q_x·Q_wᵀ)[m, n] + b_x·a_w[n]·Σ_k Q_w[n, k]
                   + a_x·b_w[n]·Σ_k Q_x[m, k] + K·b_x·b_w[n]

where ``Q_x·Q_wᵀ`` is an int8 × int8 → int32 product, exact. The last two terms vanish for ternary, binary
and symmetric weights (``b_w = 0``). The codes are the trained student's own: ``Q`` is computed with the same
operations in the same order as the fake-quant forward (:mod:`ds_kdqat.quant.functional`), so only the float
rounding of the final scaling differs.

Weight kinds (:data:`WEIGHT_FORMS`, keyed by the stored code kind of :mod:`ds_kdqat.quant.methods`) take the
unsigned codes the packed export stores; activation encoders (:data:`ACTIVATION_ENCODERS`, keyed by the
activation method name) take a float tensor and the settings of its quantizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

INT8_MAX_BITS = 8


@dataclass
class IntTensor:
    """``x̂ = scale·codes + shift``; ``codes`` int8; ``scale``/``shift`` float32 of shape ``()`` or ``(rows,)``
    (one per index of dim 0); ``shift`` None means 0."""

    codes: torch.Tensor
    scale: torch.Tensor
    shift: Optional[torch.Tensor] = None

    def dequantize(self) -> torch.Tensor:
        view = (-1,) + (1,) * (self.codes.dim() - 1)
        scale = self.scale.reshape(view) if self.scale.dim() else self.scale
        out = self.codes.float() * scale
        if self.shift is not None:
            out = out + (self.shift.reshape(view) if self.shift.dim() else self.shift)
        return out


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A stored scale of shape ``()`` or ``(rows, 1, …)`` as ``()`` or ``(rows,)``."""
    return t.reshape(()) if t.numel() == 1 and t.dim() <= 1 else t.reshape(t.shape[0])


def _ternary(bits: int, codes: torch.Tensor, scale: torch.Tensor, offset) -> IntTensor:
    return IntTensor((codes.to(torch.int16) - 1).to(torch.int8), _rows(scale).float())  # stored b + 1


def _binary(bits: int, codes: torch.Tensor, scale: torch.Tensor, offset) -> IntTensor:
    return IntTensor((codes.to(torch.int16) * 2 - 1).to(torch.int8), _rows(scale).float())  # stored (b + 1)/2


def _symmetric(bits: int, codes: torch.Tensor, scale: torch.Tensor, offset) -> IntTensor:
    # stored q + 2^(b-1) - 1; x̂ = q / s
    q = codes.to(torch.int16) - (2 ** (bits - 1) - 1)
    return IntTensor(q.to(torch.int8), 1.0 / _rows(scale).float())


def _minmax(bits: int, codes: torch.Tensor, scale: torch.Tensor, offset) -> IntTensor:
    # stored c ∈ [0, 2^b − 1]; x̂ = c·s + m = s·(c − 2^(b−1)) + (m + 2^(b−1)·s)
    half = 2 ** (bits - 1)
    s, m = _rows(scale).float(), _rows(offset).float()
    return IntTensor((codes.to(torch.int16) - half).to(torch.int8), s, m + half * s)


WEIGHT_FORMS: dict[str, Callable[..., IntTensor]] = {
    "ternary": _ternary, "binary": _binary, "symmetric": _symmetric, "minmax": _minmax,
}
"""Stored code kind → ``(bits, unsigned codes, scale, offset) → IntTensor``."""


def weight_int_form(kind: str, bits: int, codes: torch.Tensor, scale: torch.Tensor,
                    offset: Optional[torch.Tensor]) -> IntTensor:
    """The integer form of a packed weight (codes already unpacked to its shape)."""
    if kind not in WEIGHT_FORMS:
        raise ValueError(f"no integer form for weight code kind {kind!r}; known: {sorted(WEIGHT_FORMS)}")
    if bits > INT8_MAX_BITS:
        raise ValueError(f"{bits}-bit weights do not fit int8 codes")
    return WEIGHT_FORMS[kind](bits, codes, scale, offset)


# --------------------------------------------------------------------------------------------------------------
# activations: per-tensor statistics of the current batch (uniform) or a learned step (LSQ)


def uniform_codes(x: torch.Tensor, bits: int, mode: str, clip: Optional[float],
                  zero_point: int = 0) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The codes of :func:`ds_kdqat.quant.functional.uniform_parts` (tensor granularity) with its float operations
    in its order, as integer-valued floats ``Q + zero_point`` (``Q`` signed: min-max codes moved by ``−2^(b−1)``),
    and ``(scale, shift)`` with ``x̂ = scale·Q + shift`` (``shift`` None for symmetric)."""
    if clip is not None:
        x = x.clamp(-clip, clip)
    info = torch.finfo(x.dtype)
    if mode == "symmetric":
        qmax = 2 ** (bits - 1) - 1
        scale = (qmax / x.abs().amax().clamp_min(info.tiny)).clamp_max(info.max)
        codes = torch.mul(x, scale).round_()
        return (codes.add_(zero_point) if zero_point else codes), 1.0 / scale, None
    lo, hi = torch.aminmax(x)
    step = ((hi - lo) / (2 ** bits - 1)).clamp_min(info.tiny)
    half = 2 ** (bits - 1)
    codes = torch.sub(x, lo).div_(step).round_()  # c ∈ [0, 2^b − 1]; Q = c − 2^(b−1)
    if zero_point != half:
        codes.add_(zero_point - half)
    return codes, step, lo + half * step


def lsq_codes(x: torch.Tensor, bits: int, step: torch.Tensor,
              zero_point: int = 0) -> tuple[torch.Tensor, torch.Tensor, None]:
    """The codes of :func:`ds_kdqat.quant.functional.lsq_parts`, ``round(clamp(x/s, −Q_N, Q_P))``, as
    integer-valued floats ``Q + zero_point``, and ``(s, None)``: ``x̂ = s·Q``."""
    q_n, q_p = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    step = step.reshape(())
    codes = torch.div(x, step).clamp_(-q_n, q_p).round_()
    return (codes.add_(zero_point) if zero_point else codes), step, None


def _uniform_activation(x: torch.Tensor, bits: int, mode: str, clip: Optional[float]) -> IntTensor:
    codes, scale, shift = uniform_codes(x, bits, mode, clip)
    return IntTensor(codes.to(torch.int8), scale, shift)


def _lsq_activation(x: torch.Tensor, bits: int, step: torch.Tensor) -> IntTensor:
    codes, scale, _ = lsq_codes(x, bits, step)
    return IntTensor(codes.to(torch.int8), scale)


ACTIVATION_ENCODERS: dict[str, Callable[..., IntTensor]] = {"uniform": _uniform_activation, "lsq": _lsq_activation}
"""Activation method → ``(x, bits, …its settings) → IntTensor`` (uniform: mode, clip; lsq: step)."""


# --------------------------------------------------------------------------------------------------------------
# int8 GEMM


def _int_mm_works() -> bool:
    try:
        a = torch.ones(17, 16, dtype=torch.int8)
        b = torch.ones(16, 8, dtype=torch.int8)
        return bool((torch._int_mm(a, b) == 16).all())
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


_INT_MM = None


def has_int8_gemm() -> bool:
    """Whether this PyTorch build runs ``torch._int_mm`` (int8 × int8 → int32) on the CPU."""
    global _INT_MM
    if _INT_MM is None:
        _INT_MM = _int_mm_works()
    return _INT_MM


def int8_matmul(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """``a`` (M, K) int8 · ``b_t`` (K, N) int8 → (M, N) int32, exact.

    ``torch._int_mm`` where it runs (oneDNN/VNNI on x86); otherwise an int32 product of the codes (slow, exact).
    """
    if has_int8_gemm() and a.device.type == "cpu":
        try:
            return torch._int_mm(a, b_t)
        except RuntimeError:  # shapes the kernel refuses (it wants K and N multiples of 8 on some builds)
            pass
    return torch.matmul(a.to(torch.int32), b_t.to(torch.int32))


def int_linear(x: IntTensor, w_codes_t: torch.Tensor, w_scale: torch.Tensor, w_shift: Optional[torch.Tensor],
               w_code_sums: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x̂·Ŵᵀ + bias`` from integer forms (see the module docstring).

    ``x.codes`` (M, K) int8 with scalar ``x.scale``/``x.shift``; ``w_codes_t`` (K, N) int8 (``Q_wᵀ``);
    ``w_scale`` ``a_w`` and ``w_shift`` ``b_w`` () or (N,); ``w_code_sums`` (N,) float32 ``Σ_k Q_w[n, k]``.
    Returns (M, N) float32.
    """
    acc = int8_matmul(x.codes, w_codes_t)
    out = acc.float().mul_(x.scale * w_scale)
    constant = w_scale * w_code_sums * x.shift if x.shift is not None else torch.zeros_like(w_code_sums)
    if w_shift is not None:
        k = x.codes.shape[1]
        row_sums = x.codes.sum(dim=1, dtype=torch.int32).float()  # (M,)
        out.addmm_(row_sums.unsqueeze(1), (x.scale * w_shift * torch.ones_like(w_code_sums)).unsqueeze(0))
        if x.shift is not None:
            constant = constant + k * x.shift * w_shift
    if bias is not None:
        constant = constant + bias
    return out.add_(constant)
