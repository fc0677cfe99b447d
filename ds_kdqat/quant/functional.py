"""Functional quantizers: pure tensor functions with straight-through gradients.

Every quantizer comes in two layers:

* ``*_parts`` returns the integer-valued pieces of the quantized tensor (codes and scales) without autograd;
  the packed export stores exactly these pieces and :func:`dequantize_parts` rebuilds the tensor from them
  with the same arithmetic the forward uses, so an exported model reproduces the fake-quantized one;
* the public quantizer (:func:`twn_ternarize`, :func:`lat_ternarize`, :func:`binarize`,
  :func:`uniform_quantize`) returns the fake-quantized tensor (same shape and dtype as the input) whose
  gradient is the straight-through estimate: the incoming gradient is passed to the input unchanged, except
  that it is zero where ``|x| >= clip`` when a clip is set (the clamped region, as in TernaryBERT's code);
* :func:`lsq_quantize` (learned step size, LSQ) also passes a gradient to its step size.

The classes that use these per configured method (and the arithmetic of each code kind) are in
:mod:`ds_kdqat.quant.methods`.

Granularity: ``"layer"`` (``"tensor"`` for :func:`uniform_quantize`) uses one scale for the whole tensor;
``"row"`` uses one scale per index of dim 0 (a row of a ``(out, in)`` linear weight or of a
``(vocab, hidden)`` embedding matrix); a 1-D tensor has one row per element. Scales have shape ``()`` for
a tensor and ``(rows, 1, …, 1)`` (broadcastable against the input) for rows.

Degenerate inputs (all zeros, a zero row, a constant tensor, a single element) give finite outputs: an empty
ternary support gives ``α = 0``; a zero range in min-max mode and a zero maximum in symmetric mode give the
input back (zeros stay zeros, a constant stays that constant).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from ds_kdqat.quant.codes import HALF_DTYPES, Codes, code_dtype

Granularity = Literal["layer", "row"]
UniformGranularity = Literal["tensor", "row"]
UniformMode = Literal["minmax", "symmetric"]

GRANULARITIES = ("layer", "row")
UNIFORM_GRANULARITIES = ("tensor", "row")
UNIFORM_MODES = ("minmax", "symmetric")
TWN_THRESHOLD_FACTOR = 0.7  # Δ = 0.7·mean|w| (Li et al., 2016)


# --------------------------------------------------------------------------------------------------------------
# straight-through estimator


class _StraightThrough(torch.autograd.Function):
    """Forward: return ``x_hat``. Backward: pass the gradient to ``x`` (masked to ``|x| < clip``).

    ``sink``, when given, is a float32 tensor of ``x``'s shape that the gradient reaching ``x`` is added into;
    the loss-aware ternarizer uses it to collect the gradient for its second-moment estimate.
    """

    @staticmethod
    def forward(ctx, x, x_hat, clip, sink):  # type: ignore[override]
        ctx.has_clip = clip is not None
        if ctx.has_clip:
            ctx.save_for_backward(x.detach().abs() < clip)
        ctx.sink = sink
        return x_hat

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if ctx.has_clip:
            (inside,) = ctx.saved_tensors
            grad = grad * inside
        if ctx.sink is not None:
            ctx.sink.add_(grad.detach().reshape(ctx.sink.shape).to(ctx.sink.dtype))
        return grad, None, None, None


def straight_through(
    x: torch.Tensor, x_hat: torch.Tensor, clip: Optional[float] = None, sink: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``x_hat`` in the forward, identity (masked to ``|x| < clip``) in the backward.

    ``x_hat`` must not require grad. Without autograd (no grad mode, or ``x`` not requiring grad) this is
    ``x_hat`` itself.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return _StraightThrough.apply(x, x_hat, clip, sink)
    return x_hat


# --------------------------------------------------------------------------------------------------------------
# shared helpers


def _check(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {list(allowed)}, got {value!r}")


def _check_uniform_args(bits: int, mode: str, granularity: str) -> None:
    _check(mode, UNIFORM_MODES, "mode")
    _check(granularity, UNIFORM_GRANULARITIES, "granularity")
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an int in [2, 16], got {bits!r}")


def _clip(w: torch.Tensor, clip: Optional[float]) -> torch.Tensor:
    if clip is None:
        return w
    if not clip > 0:
        raise ValueError(f"clip must be > 0 or None, got {clip!r}")
    return w.clamp(-clip, clip)


def _reduce_dims(x: torch.Tensor, granularity: str) -> Optional[tuple[int, ...]]:
    """Dims to reduce over: None for the whole tensor; all but dim 0 for rows (a 1-D tensor keeps each element)."""
    if granularity in ("layer", "tensor"):
        return None
    if x.dim() == 0:
        raise ValueError("row granularity needs a tensor with at least one dimension")
    return tuple(range(1, x.dim()))


def _reduce(op: str, x: torch.Tensor, dims: Optional[tuple[int, ...]]) -> torch.Tensor:
    """``x.<op>`` (sum, mean, amax) over the whole tensor (``dims`` None) or per row, kept broadcastable;
    with 1-D rows (``dims`` empty) every element is its own row and ``x`` comes back as is."""
    if dims is None:
        return getattr(x, op)()
    if not dims:
        return x
    return getattr(x, op)(dim=dims, keepdim=True)


def _sum(x: torch.Tensor, dims: Optional[tuple[int, ...]]) -> torch.Tensor:
    return _reduce("sum", x, dims)


def _mean(x: torch.Tensor, dims: Optional[tuple[int, ...]]) -> torch.Tensor:
    return _reduce("mean", x, dims)


def _amax(x: torch.Tensor, dims: Optional[tuple[int, ...]]) -> torch.Tensor:
    return _reduce("amax", x, dims)


def _aminmax(x: torch.Tensor, dims: Optional[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
    if dims is None:
        lo, hi = torch.aminmax(x)
        return lo, hi
    if not dims:
        return x, x
    flat = x.reshape(x.shape[0], -1)
    lo, hi = torch.aminmax(flat, dim=1)
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    return lo.reshape(shape), hi.reshape(shape)


# --------------------------------------------------------------------------------------------------------------
# quantized pieces


@dataclass
class QuantParts:
    """Integer codes and scales of a quantized tensor.

    ``kind`` ``"ternary"``: ``codes`` ∈ {-1, 0, 1}, ``x̂ = scale · codes``;
    ``"binary"``: ``codes`` ∈ {-1, 1}, ``x̂ = scale · codes``;
    ``"symmetric"``: ``codes`` ∈ [-(2^(b-1)-1), 2^(b-1)-1], ``x̂ = codes / scale``;
    ``"minmax"``: ``codes`` ∈ [0, 2^b - 1], ``x̂ = codes · scale + offset``;
    ``"lsq"``: ``codes`` ∈ [-2^(b-1), 2^(b-1)-1], ``x̂ = codes · scale`` (``scale`` is the step size s).
    ``codes`` has the input's shape and dtype (integer-valued floats); ``scale``/``offset`` are ``()`` or
    ``(rows, 1, …)``.
    """

    kind: str
    codes: torch.Tensor
    scale: torch.Tensor
    offset: Optional[torch.Tensor] = None
    bits: int = 2


def dequantize_parts(parts: QuantParts) -> torch.Tensor:
    """Rebuild the fake-quantized tensor from its pieces (the exact arithmetic of the forward).

    Dispatches on ``parts.kind`` to the registered method that stores that kind
    (:func:`ds_kdqat.quant.methods.method_for_kind`).
    """
    from ds_kdqat.quant.methods import method_for_kind  # the registry imports this module: import on use

    return method_for_kind(parts.kind).dequantize(parts)


def _ternary_alpha(abs_w: torch.Tensor, support: torch.Tensor, dims, weight: Optional[torch.Tensor] = None):
    """α = Σ (D·|w| over the support) / Σ (D over the support); 0 where the support is empty."""
    if weight is None:
        num = _sum(abs_w * support, dims)
        den = _sum(support, dims)
    else:
        num = _sum(weight * abs_w * support, dims)
        den = _sum(weight * support, dims)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))


def _twn_core(w: torch.Tensor, granularity: str, clip: Optional[float]):
    """Clamped ``w``, the support ``|w| > Δ`` (bool) and α (``()`` or ``(rows, 1, …)``). An fp16/bf16 ``w`` is
    worked on in float32 (the quantizer's statistics are kept in fp32): the clamped ``w`` and α come back in
    float32, and the caller rounds its result to the weight's dtype once."""
    _check(granularity, GRANULARITIES, "granularity")
    w = _clip(w.detach(), clip)
    if w.dtype in HALF_DTYPES:
        w = w.float()
    dims = _reduce_dims(w, granularity)
    abs_w = w.abs()
    support = abs_w > TWN_THRESHOLD_FACTOR * _mean(abs_w, dims)
    count = _sum(support, dims)
    total = _sum(abs_w.mul_(support), dims)
    alpha = torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))
    return w, support, alpha


@torch.no_grad()
def twn_parts(w: torch.Tensor, granularity: Granularity = "layer", clip: Optional[float] = None) -> QuantParts:
    """Ternary Weight Networks: ``Δ = 0.7·mean|w|``, ``b = sign(w)·[|w| > Δ]``, ``α = mean |w| over b ≠ 0``.

    ``w`` is clamped to ``±clip`` first (when set) and every statistic uses the clamped values. A value equal to
    Δ maps to 0 (the threshold is strict).
    """
    wc, support, alpha = _twn_core(w, granularity, clip)
    return QuantParts("ternary", (torch.sign(wc) * support).to(w.dtype), alpha.to(w.dtype), bits=2)


@torch.no_grad()
def _fake_twn(w: torch.Tensor, granularity: str, clip: Optional[float]) -> torch.Tensor:
    """``dequantize_parts(twn_parts(...))`` in fewer passes: ``copysign(α, w)·[|w| > Δ]`` equals ``α·b``
    bit for bit (signed zeros included)."""
    wc, support, alpha = _twn_core(w, granularity, clip)
    return _ternary_value(wc, support, alpha, w.dtype)


def _ternary_value(wc: torch.Tensor, support: torch.Tensor, alpha: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``α·b`` as ``copysign(α, w)·support`` (equal bit for bit, signed zeros included), rounded to ``dtype``;
    ``support`` a bool or 0/1 mask, ``wc`` the (clamped, possibly float32) weight the support was taken from."""
    return torch.copysign(alpha, wc).mul_(support).to(dtype)


def _ternary_codes(x_hat: torch.Tensor, alpha: torch.Tensor) -> Codes:
    """The codes of a ternary (or binary) ``x̂ = α·b``: ``b = sign(x̂)`` as int8 (α ≥ 0), so that
    ``Codes.values()`` gives ``α·b`` again (±α and 0)."""
    return Codes(torch.sign(x_hat).to(torch.int8), alpha, dtype=x_hat.dtype)


@torch.no_grad()
def twn_with_codes(w: torch.Tensor, granularity: Granularity = "layer",
                   clip: Optional[float] = None) -> tuple[torch.Tensor, Codes]:
    """:func:`_fake_twn`'s tensor (no autograd) and its int8 codes."""
    wc, support, alpha = _twn_core(w, granularity, clip)
    x_hat = _ternary_value(wc, support, alpha, w.dtype)
    return x_hat, _ternary_codes(x_hat, alpha)


class _Workspace(threading.local):
    """Scratch buffers of the LAT solver, kept between calls (one set per thread, device and dtype).

    The solver needs five tensor-sized temporaries per weight (|w|, D, D·|w|, the support mask, a product);
    allocating them afresh for every weight of every forward is what made LAT slow on CPU (large blocks come
    from ``mmap`` and go back on free, so each call paid page faults). Buffers grow to the largest request up
    to :data:`LAT_WORKSPACE_MAX_ELEMENTS` elements; larger requests get temporaries.
    """

    def __init__(self):
        self.buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def take(self, numel: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if numel > LAT_WORKSPACE_MAX_ELEMENTS:
            return torch.empty(numel, device=device, dtype=dtype)
        key = (device, dtype)
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            self.buffers.pop(key, None)
            buffer = self.buffers[key] = torch.empty(numel, device=device, dtype=dtype)
        return buffer[:numel]


LAT_WORKSPACE_MAX_ELEMENTS = 5 * 2**23  # 5 buffers of 8.4 M elements (160 MiB in float32)
_LAT_WORKSPACE = _Workspace()


def _lat_solve(
    w: torch.Tensor,
    second_moment: torch.Tensor,
    granularity: str,
    clip: Optional[float],
    iters: int,
    eps: float,
    rows: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The alternating LAT solution: ``(w clamped, support mask, α)``.

    The mask is a 0/1 tensor of ``w``'s shape and dtype that lives in the workspace (valid until the next
    call); α has shape ``()`` (layer) or ``(rows, 1, …)`` (row). ``rows``: ``w`` holds rows ``rows`` of the
    table ``second_moment`` belongs to (row granularity only; D is read from those rows).

    Arithmetic, step by step, is the plain alternating algorithm's (fresh tensors, ``torch.equal`` on the codes;
    ``tests/test_lat_solver.py`` has it): the same products and the same reductions over tensors of the same
    shape, so α and the codes come out bit for bit equal. What differs: nothing tensor-sized is allocated
    (every temporary is a workspace view, written in place); the support is kept as a float mask (comparisons
    into float and float sums are several times faster than bool tensors); and "b stopped changing" is decided
    from the support sizes: consecutive supports are nested (``{|w| > Δ}`` for two thresholds), so they are
    equal exactly when their sizes are.
    """
    w = _clip(w.detach(), clip)
    dims = _reduce_dims(w, granularity)
    if dims is None:
        shape2 = (w.numel(),)
        sum_ = lambda x: x.sum()  # noqa: E731
    else:
        shape2 = (w.shape[0], w.numel() // w.shape[0]) if w.shape[0] else (0, 1)
        sum_ = lambda x: x.sum(dim=1, keepdim=True)  # noqa: E731
    n = w.numel()
    dtype = w.dtype
    buf = _LAT_WORKSPACE.take(5 * n, w.device, dtype)
    a, d, dw, mask, tmp = (buf[i * n:(i + 1) * n].view(shape2) for i in range(5))
    torch.abs(w.reshape(shape2), out=a)
    v = second_moment.detach()
    if rows is not None:
        if dims is None:
            raise ValueError("rows needs row granularity")
        table = v.reshape(v.shape[0], -1)
        if table.dtype == dtype:
            torch.index_select(table, 0, rows, out=d)
        else:  # convert the looked-up rows only, not the table
            d.copy_(table.index_select(0, rows))
        d.sqrt_()
    else:
        torch.sqrt(v.to(dtype).reshape(shape2), out=d)
    d.add_(eps)
    torch.mul(d, a, out=dw)
    # start: TWN's support |w| > 0.7·mean|w| (as twn_parts computes it)
    threshold = TWN_THRESHOLD_FACTOR * (a.mean() if dims is None else a.mean(dim=1, keepdim=True))
    torch.gt(a, threshold, out=mask)
    # support sizes must be exact: float32 sums of 0/1 are up to 2^24 (a bf16/fp16 result is not past 256/2048)
    count_dtype = None if dtype == torch.float64 else torch.float32 if shape2[-1] < 2**24 else torch.float64

    def count() -> torch.Tensor:
        return mask.sum(dtype=count_dtype) if dims is None else mask.sum(dim=1, keepdim=True, dtype=count_dtype)

    def alpha_of_mask() -> torch.Tensor:
        num = sum_(torch.mul(dw, mask, out=tmp))
        den = sum_(torch.mul(d, mask, out=tmp))
        # _ternary_alpha's formula (a Python 0 in place of zeros_like: same values, no tensor to build)
        return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), 0.0)

    size = count()
    for _ in range(iters):
        alpha = alpha_of_mask()
        torch.gt(a, alpha / 2, out=mask)
        new_size = count()
        if torch.equal(new_size, size):  # b unchanged: the mask is the previous support
            return w, mask.view(w.shape), _scale_shape(alpha, w, dims)
        size = new_size
    return w, mask.view(w.shape), _scale_shape(alpha_of_mask(), w, dims)


def _scale_shape(alpha: torch.Tensor, w: torch.Tensor, dims) -> torch.Tensor:
    """α as the other ternary scales are shaped: ``()`` per tensor, ``(rows, 1, …, 1)`` per row."""
    if dims is None:
        return alpha
    return alpha.reshape((w.shape[0],) + (1,) * (w.dim() - 1)) if w.dim() > 1 else alpha.reshape(w.shape)


def _check_lat_args(w: torch.Tensor, second_moment: torch.Tensor, iters: int, rows: Optional[torch.Tensor]) -> None:
    if rows is None and second_moment.shape != w.shape:
        raise ValueError(f"second_moment has shape {tuple(second_moment.shape)}, expected {tuple(w.shape)}")
    if rows is not None and (rows.dim() != 1 or rows.numel() != w.shape[0]
                             or tuple(second_moment.shape[1:]) != tuple(w.shape[1:])):
        raise ValueError(f"rows ({tuple(rows.shape)}) must index one row of second_moment "
                         f"({tuple(second_moment.shape)}) per row of w ({tuple(w.shape)})")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")


@torch.no_grad()
def lat_parts(
    w: torch.Tensor,
    second_moment: Optional[torch.Tensor],
    granularity: Granularity = "layer",
    clip: Optional[float] = None,
    iters: int = 10,
    eps: float = 1e-6,
    rows: Optional[torch.Tensor] = None,
) -> QuantParts:
    """Loss-aware ternarization (Hou & Kwok, 2018), the approximate alternating solver.

    Minimises ``Σ D·(w − α·b)²`` over α > 0 and b ∈ {-1, 0, 1}ⁿ (per tensor or per row) with
    ``D = sqrt(v) + eps`` from the second moment ``v`` (shape of ``w``). Starting from TWN's ``b``, it
    alternates ``α = Σ|b·D·w| / Σ|b·D|`` and ``b = sign(w)·[|w| > α/2]`` until ``b`` stops changing or
    ``iters`` rounds have run; each half-step does not increase the objective, so the result is never worse
    than TWN's (in D-weighted error). Without a second moment this is :func:`twn_parts`.

    ``rows`` (row granularity): ``w`` is made of rows ``rows`` of a larger table whose second moment
    ``second_moment`` is (the looked-up rows of an embedding); each row's result is the one it has in the
    table, rows being independent.
    """
    if second_moment is None:
        return twn_parts(w, granularity, clip)
    wc, mask, alpha = _lat_solution(w, second_moment, granularity, clip, iters, eps, rows)
    return QuantParts("ternary", torch.sign(wc).mul_(mask).to(w.dtype), alpha, bits=2)


@torch.no_grad()
def _fake_lat(
    w: torch.Tensor,
    second_moment: Optional[torch.Tensor],
    granularity: str,
    clip: Optional[float],
    iters: int,
    eps: float,
    rows: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``dequantize_parts(lat_parts(...))`` in fewer passes: ``copysign(α, w)·mask`` equals ``α·b`` bit for bit
    (signed zeros included), as in :func:`_fake_twn`."""
    if second_moment is None:
        return _fake_twn(w, granularity, clip)
    wc, mask, alpha = _lat_solution(w, second_moment, granularity, clip, iters, eps, rows)
    return _ternary_value(wc, mask, alpha, w.dtype)


def _lat_solution(w, second_moment, granularity, clip, iters, eps, rows):
    """:func:`_lat_solve` after the argument checks; an fp16/bf16 ``w`` is solved in float32 (LAT's statistics
    are kept in fp32), α rounded to ``w``'s dtype."""
    _check(granularity, GRANULARITIES, "granularity")
    _check_lat_args(w, second_moment, iters, rows)
    solve_on = w.float() if w.dtype in HALF_DTYPES else w
    wc, mask, alpha = _lat_solve(solve_on, second_moment, granularity, clip, iters, eps, rows)
    return wc, mask, alpha.to(w.dtype)


@torch.no_grad()
def lat_with_codes(
    w: torch.Tensor,
    second_moment: Optional[torch.Tensor],
    granularity: Granularity = "layer",
    clip: Optional[float] = None,
    iters: int = 10,
    eps: float = 1e-6,
    rows: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Codes]:
    """:func:`_fake_lat`'s tensor (no autograd) and its int8 codes."""
    if second_moment is None:
        return twn_with_codes(w, granularity, clip)
    wc, mask, alpha = _lat_solution(w, second_moment, granularity, clip, iters, eps, rows)
    x_hat = _ternary_value(wc, mask, alpha, w.dtype)
    return x_hat, _ternary_codes(x_hat, alpha)


@torch.no_grad()
def binary_parts(w: torch.Tensor, granularity: Granularity = "layer", clip: Optional[float] = None) -> QuantParts:
    """``α = mean|w|``, ``b = sign(w)`` with ``sign(0) = +1`` (so every code is ±1)."""
    _check(granularity, GRANULARITIES, "granularity")
    w = _clip(w.detach(), clip)
    dims = _reduce_dims(w, granularity)
    alpha = _mean(w.abs(), dims)
    codes = torch.where(w < 0, -torch.ones_like(w), torch.ones_like(w))
    return QuantParts("binary", codes, alpha, bits=1)


def _uniform_rounded(x: torch.Tensor, bits: int, mode: str, granularity: str, clip: Optional[float],
                     layout: Optional[str] = None):
    """The rounded codes of uniform quantization as a float tensor, with the scale and offset:
    ``(round(x·s), s, None)`` (symmetric) or ``(round((x − min)/s), s, min)`` (min-max), no autograd.

    Statistics and arithmetic are float32 for an fp16/bf16 ``x`` (an 8-bit code needs more mantissa than bf16
    has), else in ``x``'s dtype. ``layout``: the codes' memory layout, None for ``x``'s, ``"contiguous"``, or
    ``"transposed"`` (contiguous with the last two dims swapped, i.e. ``codes.transpose(-1, -2)`` is
    contiguous, as a matmul's right operand ``k̂ᵀ`` is).
    """
    _check_uniform_args(bits, mode, granularity)
    x = _clip(x.detach(), clip)
    if x.dtype in HALF_DTYPES:
        x = x.float()
    dims = _reduce_dims(x, granularity)
    info = torch.finfo(x.dtype)
    out = _empty_in_layout(x, layout)
    if mode == "symmetric":
        qmax = 2 ** (bits - 1) - 1
        # capping the scale keeps it finite when max|x| is 0 (or tiny): zeros then quantize to zeros
        scale = (qmax / _amax(x.abs(), dims).clamp_min(info.tiny)).clamp_max(info.max)
        return torch.mul(x, scale, out=out).round_(), scale, None
    lo, hi = _aminmax(x, dims)
    step = ((hi - lo) / (2**bits - 1)).clamp_min(info.tiny)
    return torch.sub(x, lo, out=out).div_(step).round_(), step, lo


def _empty_in_layout(x: torch.Tensor, layout: Optional[str]) -> Optional[torch.Tensor]:
    if layout is None:
        return None
    if layout == "contiguous":
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if layout == "transposed" and x.dim() >= 2:
        shape = x.shape[:-2] + (x.shape[-1], x.shape[-2])
        return torch.empty(shape, dtype=x.dtype, device=x.device).transpose(-1, -2)
    raise ValueError(f"layout must be None, 'contiguous' or 'transposed' (2+ dims), got {layout!r}")


def _uniform_dequantize_(rounded: torch.Tensor, scale: torch.Tensor, offset: Optional[torch.Tensor],
                         dtype: torch.dtype) -> torch.Tensor:
    """``x̂`` from :func:`_uniform_rounded`'s pieces, in place on ``rounded``, cast to ``dtype``."""
    x_hat = rounded.div_(scale) if offset is None else rounded.mul_(scale).add_(offset)
    return x_hat.to(dtype)


@torch.no_grad()
def uniform_parts(
    x: torch.Tensor,
    bits: int,
    mode: UniformMode = "minmax",
    granularity: UniformGranularity = "tensor",
    clip: Optional[float] = None,
) -> QuantParts:
    """Uniform n-bit quantization.

    minmax: ``s = (max − min)/(2^b − 1)``, ``codes = round((x − min)/s)``, ``x̂ = codes·s + min``;
    symmetric: ``s = (2^(b−1) − 1)/max|x|``, ``codes = round(x·s)``, ``x̂ = codes/s``.
    Statistics are taken after clamping to ``±clip`` (when set). A zero range (constant input) or a zero
    maximum gives the input back. For an fp16/bf16 ``x`` codes, scale and offset are float32.
    """
    rounded, scale, offset = _uniform_rounded(x, bits, mode, granularity, clip)
    return QuantParts(mode, rounded, scale, offset, bits=bits)


# --------------------------------------------------------------------------------------------------------------
# public quantizers (fake quantization with straight-through gradients)


def twn_ternarize(w: torch.Tensor, granularity: Granularity = "layer", clip: Optional[float] = None) -> torch.Tensor:
    """TWN ternary ``α·sign(w)·[|w| > Δ]``, ``Δ = 0.7·mean|w|`` (see :func:`twn_parts`). Shape of ``w``."""
    return straight_through(w, _fake_twn(w, granularity, clip), clip)


def lat_ternarize(
    w: torch.Tensor,
    second_moment: Optional[torch.Tensor],
    granularity: Granularity = "layer",
    iters: int = 10,
    clip: Optional[float] = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Loss-aware ternary ``α·b`` minimising ``Σ D·(w − α·b)²`` (see :func:`lat_parts`). Shape of ``w``."""
    return straight_through(w, _fake_lat(w, second_moment, granularity, clip, iters, eps), clip)


def binarize(w: torch.Tensor, granularity: Granularity = "layer", clip: Optional[float] = None) -> torch.Tensor:
    """Binary ``α·sign(w)``, ``α = mean|w|`` (see :func:`binary_parts`). Shape of ``w``."""
    return straight_through(w, dequantize_parts(binary_parts(w, granularity, clip)), clip)


@torch.no_grad()
def _fake_uniform(x: torch.Tensor, bits: int, mode: str, granularity: str, clip: Optional[float]) -> torch.Tensor:
    """``dequantize_parts(uniform_parts(...))`` with the same arithmetic done in place on one fresh buffer
    (activations are quantized every forward: fewer large allocations and passes than building the codes);
    ``x``'s dtype."""
    rounded, scale, offset = _uniform_rounded(x, bits, mode, granularity, clip)
    return _uniform_dequantize_(rounded, scale, offset, x.dtype)


@torch.no_grad()
def uniform_with_codes(x: torch.Tensor, bits: int, mode: UniformMode = "minmax",
                       granularity: UniformGranularity = "tensor", clip: Optional[float] = None,
                       layout: Optional[str] = None) -> tuple[torch.Tensor, Codes]:
    """:func:`_fake_uniform`'s tensor (no autograd; memory layout ``layout``, see :func:`_uniform_rounded`)
    and its integer codes (uint8 for min-max and int8 for symmetric up to 8 bits)."""
    rounded, scale, offset = _uniform_rounded(x, bits, mode, granularity, clip, layout)
    if offset is None:
        limit = 2 ** (bits - 1) - 1
        codes = rounded.to(code_dtype(-limit, limit))
    else:
        codes = rounded.to(code_dtype(0, 2**bits - 1))
    return (_uniform_dequantize_(rounded, scale, offset, x.dtype),
            Codes(codes, scale, offset, divide=offset is None, dtype=x.dtype))


def uniform_quantize(
    x: torch.Tensor,
    bits: int,
    mode: UniformMode = "minmax",
    granularity: UniformGranularity = "tensor",
    clip: Optional[float] = None,
) -> torch.Tensor:
    """Uniform n-bit fake quantization (see :func:`uniform_parts`). Shape and dtype of ``x``."""
    return straight_through(x, _fake_uniform(x, bits, mode, granularity, clip), clip)


# --------------------------------------------------------------------------------------------------------------
# learned step size (LSQ, Esser et al. 2020)


def lsq_range(bits: int) -> tuple[int, int]:
    """``(Q_N, Q_P) = (2^(b−1), 2^(b−1) − 1)``: the signed code range ``[−Q_N, Q_P]`` of ``bits`` bits."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an int in [2, 16], got {bits!r}")
    return 2 ** (bits - 1), 2 ** (bits - 1) - 1


@torch.no_grad()
def lsq_initial_step(x: torch.Tensor, bits: int) -> torch.Tensor:
    """LSQ's initial step size ``s₀ = 2·mean|x| / √Q_P`` (a ``()`` tensor of ``x``'s dtype)."""
    _, q_p = lsq_range(bits)
    return 2 * x.detach().abs().mean() / math.sqrt(q_p)


@torch.no_grad()
def lsq_parts(x: torch.Tensor, step: torch.Tensor, bits: int) -> QuantParts:
    """``codes = round(clamp(x/s, −Q_N, Q_P))``, ``x̂ = codes · s`` (kind ``"lsq"``; ``scale = s``, ``step``'s
    shape)."""
    q_n, q_p = lsq_range(bits)
    step = step.detach()
    return QuantParts("lsq", torch.div(x.detach(), step).clamp_(-q_n, q_p).round_(), step, bits=bits)


class _LearnedStep(torch.autograd.Function):
    """Forward ``x̂ = round(clamp(x/s, −Q_N, Q_P))·s``; backward as in LSQ (Esser et al., 2020).

    With ``v = x/s``: ``∂x̂/∂x = 1`` for ``−Q_N < v < Q_P`` and 0 outside (straight-through for the round);
    ``∂x̂/∂s = round(v) − v`` inside, ``−Q_N`` for ``v ≤ −Q_N``, ``Q_P`` for ``v ≥ Q_P``; the gradient of ``s``
    (summed over the elements) is multiplied by ``grad_scale``.
    """

    @staticmethod
    def forward(ctx, x, step, q_n, q_p, grad_scale):  # type: ignore[override]
        ctx.save_for_backward(x, step)
        ctx.q_n, ctx.q_p, ctx.grad_scale = q_n, q_p, grad_scale
        return torch.div(x, step).clamp_(-q_n, q_p).round_().mul_(step)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, step = ctx.saved_tensors
        v = x / step
        below, above = v <= -ctx.q_n, v >= ctx.q_p
        grad_x = grad_step = None
        if ctx.needs_input_grad[0]:
            grad_x = grad * ~(below | above)
        if ctx.needs_input_grad[1]:
            d_step = (v.round() - v).masked_fill_(below, -ctx.q_n).masked_fill_(above, ctx.q_p)
            grad_step = ((grad * d_step).sum() * ctx.grad_scale).reshape(step.shape).to(step.dtype)
        return grad_x, grad_step, None, None, None


def lsq_quantize(x: torch.Tensor, step: torch.Tensor, bits: int, grad_scale: Optional[float] = None) -> torch.Tensor:
    """LSQ fake quantization of ``x`` (any shape) with the step size ``step`` (``()`` or ``(1,)``, learnable).

    ``x̂ = round(clamp(x/s, −Q_N, Q_P))·s`` with ``(Q_N, Q_P)`` from :func:`lsq_range`; gradients as in
    :class:`_LearnedStep`, with ``grad_scale`` ``g = 1/√(N·Q_P)`` by default (``N`` = ``x.numel()``).
    Shape and dtype of ``x``.
    """
    q_n, q_p = lsq_range(bits)
    if grad_scale is None:
        grad_scale = 1.0 / math.sqrt(max(x.numel(), 1) * q_p)
    if torch.is_grad_enabled() and (x.requires_grad or step.requires_grad):
        return _LearnedStep.apply(x, step, q_n, q_p, grad_scale)
    return torch.div(x, step).clamp_(-q_n, q_p).round_().mul_(step)


@torch.no_grad()
def lsq_codes(x_hat: torch.Tensor, step: torch.Tensor, bits: int) -> Codes:
    """The codes of an LSQ output ``x̂ = c·s`` (``c = round(x̂/s)`` recovers ``c`` exactly: ``|c| ≤ 2^15`` and
    ``x̂/s`` is within a few ulps of it), so ``Codes.values()`` gives ``c·s`` again."""
    q_n, q_p = lsq_range(bits)
    step = step.detach().to(x_hat.dtype)
    return Codes(torch.div(x_hat.detach(), step).round_().to(code_dtype(-q_n, q_p)), step, dtype=x_hat.dtype)


TERNARY_ENTROPY_BITS = math.log2(3)  # information floor of one ternary weight
