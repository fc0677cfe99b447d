"""Quantization methods: one class per method, registered under the name configs use (``QUANT_METHODS``).

A method instance holds its settings (bits, granularity, clip, mode) and knows

* ``parts(x, owner)``: the integer codes and scales of ``x`` (:class:`~ds_kdqat.quant.functional.QuantParts`);
* ``quantize(x, owner)``: the fake-quantized ``x`` (same shape and dtype) with a straight-through gradient;
* ``dequantize(parts)`` / ``encode(parts)`` / ``decode(...)``: the arithmetic of its code kind, and the unsigned
  integers the packed export stores (``encode``) and turns back into values (``decode``);
* ``attach(owner)``: registers learned tensors on the quantizer module that uses it (LSQ's step size).

``owner`` is the :class:`~ds_kdqat.quant.modules.WeightQuantizer` or :class:`~ds_kdqat.quant.modules.ActQuantizer`
module the method serves: it holds the per-tensor state (LAT's second moment, LSQ's step). Registered methods:

========  =========  ===========  ===========  ======================================================
name      kind       weight bits  act. bits    x̂
========  =========  ===========  ===========  ======================================================
twn       ternary    2            -            α·b, b = sign(w)·[|w| > 0.7·mean|w|], α = mean over b ≠ 0
lat       ternary    2            -            α·b minimising Σ D·(w − α·b)², D = √v + eps
binary    binary     1            -            α·sign(w), α = mean|w|
uniform   symmetric  2..8         2..16        symmetric: round(x·s)/s, s = (2^(b−1)−1)/max|x|;
          / minmax                             minmax: round((x−min)/s)·s + min, s = (max−min)/(2^b−1)
lsq       lsq        -            2..16        round(clamp(x/s, −Q_N, Q_P))·s with a learned step s
========  =========  ===========  ===========  ======================================================

Adding a method: subclass :class:`QuantMethod` in any imported module, decorate it with
``@register_method("name")``, fill in its bits and ``parts`` (and ``quantize``/codes if it differs from the
defaults); the config's ``method``/``act_method`` then accept the name, and modules and export use it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional

import torch
from torch import nn

from ds_kdqat.quant.codes import Codes
from ds_kdqat.quant.functional import (
    QuantParts,
    _fake_lat,
    _fake_twn,
    _fake_uniform,
    binary_parts,
    lat_parts,
    lat_with_codes,
    lsq_codes,
    lsq_initial_step,
    lsq_parts,
    lsq_quantize,
    straight_through,
    twn_parts,
    twn_with_codes,
    uniform_parts,
    uniform_with_codes,
)

if TYPE_CHECKING:
    from ds_kdqat.quant.config import LatConfig

MODES = ("minmax", "symmetric")

# name -> method class, in registration order (the order configs list them in errors)
QUANT_METHODS: dict[str, type["QuantMethod"]] = {}


def register_method(name: str) -> Callable[[type["QuantMethod"]], type["QuantMethod"]]:
    """Class decorator: register a :class:`QuantMethod` subclass under ``name``."""

    def register(cls: type["QuantMethod"]) -> type["QuantMethod"]:
        if name in QUANT_METHODS:
            raise ValueError(f"quantization method {name!r} is registered twice")
        cls.name = name
        QUANT_METHODS[name] = cls
        return cls

    return register


def weight_methods() -> tuple[str, ...]:
    """Names of the methods that quantize weights (``groups[].method``)."""
    return tuple(name for name, cls in QUANT_METHODS.items() if cls.weight_bits)


def activation_methods() -> tuple[str, ...]:
    """Names of the methods that quantize activations (``groups[].act_method``, ``attention.method``)."""
    return tuple(name for name, cls in QUANT_METHODS.items() if cls.act_bits)


def method_for_kind(kind: str) -> type["QuantMethod"]:
    """The first registered method storing codes of ``kind`` (whose arithmetic decodes them)."""
    for cls in QUANT_METHODS.values():
        if kind in cls.kinds:
            return cls
    raise ValueError(f"unknown quantized kind {kind!r}")


class QuantMethod:
    """Base of all methods; a subclass sets the class attributes below and implements :meth:`parts`.

    ``weight_bits`` / ``act_bits``: the bit widths it accepts for weights / activations (empty: not usable
    there); ``default_bits``: the weight bits when a group leaves ``bits`` null; ``kinds``: the code kinds its
    parts can have; ``modes``: the ``mode`` values it accepts; ``supports_clip``: whether ``clip`` applies;
    ``rows_independent``: with row granularity, a row's quantization depends on that row only (an embedding
    may then quantize just the looked-up rows); ``label``: its name in reports.
    """

    name: ClassVar[str] = ""
    weight_bits: ClassVar[tuple[int, ...]] = ()
    default_bits: ClassVar[int] = 0
    act_bits: ClassVar[tuple[int, ...]] = ()
    kinds: ClassVar[tuple[str, ...]] = ()
    modes: ClassVar[tuple[str, ...]] = MODES
    supports_clip: ClassVar[bool] = True
    rows_independent: ClassVar[bool] = True
    label: ClassVar[str] = ""

    def __init__(self, bits: int, granularity: str = "layer", clip: Optional[float] = None,
                 mode: str = "symmetric"):
        self.bits, self.granularity, self.clip, self.mode = bits, granularity, clip, mode

    # -- the settings' names ------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """The code kind of this instance's parts."""
        return self.kinds[0]

    def describe(self) -> str:
        """Weight description: ``"<label> <bits>-bit <granularity>-wise"``."""
        return f"{self.label or self.name} {self.bits}-bit {self.granularity}-wise"

    def describe_activation(self) -> str:
        """Activation description: ``"A<bits> <label>"``."""
        return f"A{self.bits} {self.label or self.name}"

    # -- quantization ---------------------------------------------------------------------------------------
    def attach(self, owner: nn.Module) -> None:
        """Register learned tensors on ``owner`` (the quantizer module); none by default."""

    def parts(self, x: torch.Tensor, owner: Any = None) -> QuantParts:
        """Codes and scales of ``x`` (no autograd)."""
        raise NotImplementedError

    def fake(self, x: torch.Tensor, owner: Any = None) -> torch.Tensor:
        """The fake-quantized ``x`` without autograd: ``dequantize(parts(x))`` unless a subclass is faster."""
        return self.dequantize(self.parts(x, owner))

    def quantize(self, x: torch.Tensor, owner: Any = None) -> torch.Tensor:
        """The fake-quantized ``x`` with the straight-through gradient (zero where ``|x| >= clip``)."""
        return straight_through(x, self.fake(x, owner), self.clip)

    def fake_with_codes(self, x: torch.Tensor, owner: Any = None,
                        layout: Optional[str] = None) -> tuple[torch.Tensor, Optional[Codes]]:
        """:meth:`fake`'s tensor and its integer codes (:class:`~ds_kdqat.quant.codes.Codes`, what autograd saves
        for the backward in its place), or None where the method has none to give. ``layout``: the memory layout
        asked of an activation's output (see :func:`~ds_kdqat.quant.functional.uniform_with_codes`)."""
        return self.fake(x, owner), None

    def quantize_with_codes(self, x: torch.Tensor, owner: Any = None,
                            layout: Optional[str] = None) -> tuple[torch.Tensor, Optional[Codes]]:
        """:meth:`quantize`'s tensor (straight-through gradient) and its codes (see :meth:`fake_with_codes`)."""
        x_hat, codes = self.fake_with_codes(x, owner, layout)
        return straight_through(x, x_hat, self.clip, self.gradient_sink(x, owner)), codes

    def gradient_sink(self, x: torch.Tensor, owner: Any = None) -> Optional[torch.Tensor]:
        """A float32 tensor of ``x``'s shape the backward adds ``x``'s gradient into, or None (the default)."""
        return None

    # -- code arithmetic and storage (per kind) -------------------------------------------------------------
    @staticmethod
    def dequantize(parts: QuantParts) -> torch.Tensor:
        """``x̂`` from codes and scales (kinds ternary, binary: ``scale · codes``)."""
        return parts.scale * parts.codes

    @staticmethod
    def encode(parts: QuantParts) -> torch.Tensor:
        """The codes as unsigned integers (uint8, the tensor's shape) for packing."""
        raise NotImplementedError

    @classmethod
    def decode(cls, kind: str, bits: int, codes: torch.Tensor, scale: torch.Tensor,
               offset: Optional[torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`encode`, then :meth:`dequantize`: the values the forward used."""
        raise NotImplementedError

    # -- learned state in the packed export -----------------------------------------------------------------
    def export_state(self, owner: nn.Module) -> dict[str, torch.Tensor]:
        """Tensors (by suffix) the packed export stores for an activation quantizer; none by default."""
        return {}

    def import_state(self, owner: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`export_state` into ``owner``."""


class TernaryMethod(QuantMethod):
    """Base of the ternary methods (not registered itself): codes b ∈ {-1, 0, 1} stored as ``b + 1`` (2 bits, or
    base-3); ``x̂ = α·b``."""

    weight_bits = (2,)
    default_bits = 2
    kinds = ("ternary",)

    @staticmethod
    def encode(parts: QuantParts) -> torch.Tensor:
        return (parts.codes + 1).round().to(torch.uint8)

    @classmethod
    def decode(cls, kind, bits, codes, scale, offset):
        return cls.dequantize(QuantParts(kind, codes.to(scale.dtype) - 1, scale, offset, bits))


@register_method("twn")
class TwnMethod(TernaryMethod):
    """Ternary Weight Networks (see :func:`~ds_kdqat.quant.functional.twn_parts`)."""

    label = "TWN"

    def parts(self, x, owner=None):
        return twn_parts(x, self.granularity, self.clip)

    def fake(self, x, owner=None):
        return _fake_twn(x, self.granularity, self.clip)  # the common case, in fewer passes (same values)

    def fake_with_codes(self, x, owner=None, layout=None):
        return twn_with_codes(x, self.granularity, self.clip)


@register_method("lat")
class LatMethod(TernaryMethod):
    """Loss-aware ternarization (see :func:`~ds_kdqat.quant.functional.lat_parts`).

    ``owner`` is the :class:`~ds_kdqat.quant.modules.WeightQuantizer` holding the second moment ``v``, the
    gradient accumulator its own estimate is built from (``grad_accum``, filled by the backward while
    ``owner.collects_gradient``) and the ``lat`` settings.
    """

    label = "LAT"
    rows_independent = False  # with its own estimate, v needs the whole table's gradient (see quantize_rows)

    @staticmethod
    def _settings(owner) -> tuple[int, float]:
        lat: Optional[LatConfig] = getattr(owner, "lat", None)
        return (lat.iters, lat.eps) if lat is not None else (10, 1e-6)

    @staticmethod
    def _moment(x: torch.Tensor, owner, rows: bool = False) -> Optional[torch.Tensor]:
        v = getattr(owner, "second_moment", None)
        if v is None:
            return None
        fits = v.shape[1:] == x.shape[1:] if rows else v.shape == x.shape
        if not fits:  # e.g. a shape change after loading: start over from TWN
            return None
        if v.device != x.device:
            v = owner.second_moment = v.to(x.device)
        return v

    def parts(self, x, owner=None):
        iters, eps = self._settings(owner)
        return lat_parts(x, self._moment(x, owner), self.granularity, self.clip, iters, eps)

    def fake(self, x, owner=None):
        iters, eps = self._settings(owner)
        return _fake_lat(x, self._moment(x, owner), self.granularity, self.clip, iters, eps)

    def fake_with_codes(self, x, owner=None, layout=None):
        iters, eps = self._settings(owner)
        return lat_with_codes(x, self._moment(x, owner), self.granularity, self.clip, iters, eps)

    def gradient_sink(self, x, owner=None):
        """Where the backward adds the gradient for LAT's own second-moment estimate (None when not collecting)."""
        if owner is not None and owner.collects_gradient and torch.is_grad_enabled() and x.requires_grad:
            return owner._accumulator(x)
        return None

    def quantize(self, x, owner=None):
        return straight_through(x, self.fake(x, owner), self.clip, self.gradient_sink(x, owner))

    def quantize_rows(self, x: torch.Tensor, owner, rows: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x``, rows ``rows`` of the (row-wise) weight ``owner`` serves, with D read at those rows;
        each row comes out as it does when the whole weight is quantized. No gradient is collected: only for a
        quantizer whose ``v`` is the optimizer's (:attr:`~ds_kdqat.quant.modules.WeightQuantizer.quantizes_rows`).
        """
        if owner.collects_gradient or self.granularity != "row":
            raise RuntimeError("LAT quantizes rows only row-wise and with the optimizer's second moment")
        iters, eps = self._settings(owner)
        v = self._moment(x, owner, rows=True)
        return straight_through(x, _fake_lat(x, v, "row", self.clip, iters, eps, rows if v is not None else None),
                                self.clip)


@register_method("binary")
class BinaryMethod(QuantMethod):
    """``α·sign(w)``, ``α = mean|w|`` (see :func:`~ds_kdqat.quant.functional.binary_parts`); codes ±1 stored as
    ``(b + 1)/2`` (1 bit)."""

    weight_bits = (1,)
    default_bits = 1
    kinds = ("binary",)
    label = "binary"

    def parts(self, x, owner=None):
        return binary_parts(x, self.granularity, self.clip)

    def fake_with_codes(self, x, owner=None, layout=None):
        parts = self.parts(x, owner)
        return self.dequantize(parts), Codes(parts.codes.to(torch.int8), parts.scale, dtype=x.dtype)

    @staticmethod
    def encode(parts):
        return ((parts.codes + 1) / 2).round().to(torch.uint8)

    @classmethod
    def decode(cls, kind, bits, codes, scale, offset):
        return cls.dequantize(QuantParts(kind, codes.to(scale.dtype) * 2 - 1, scale, offset, bits))


@register_method("uniform")
class UniformMethod(QuantMethod):
    """Uniform n-bit, ``mode`` symmetric or min-max (see :func:`~ds_kdqat.quant.functional.uniform_parts`).

    Weights: granularity ``layer`` (one scale) or ``row``; activations: one scale per tensor from the current
    batch's statistics. Symmetric codes ``q`` are stored as ``q + 2^(b−1) − 1``, min-max codes as they are.
    """

    weight_bits = tuple(range(2, 9))  # codes are packed into bytes at export
    default_bits = 8
    act_bits = tuple(range(2, 17))
    kinds = ("symmetric", "minmax")

    @property
    def kind(self) -> str:
        return self.mode

    @property
    def _tensor_granularity(self) -> str:
        return "tensor" if self.granularity == "layer" else "row"

    def describe(self) -> str:
        return f"uniform-{self.mode} {self.bits}-bit {self.granularity}-wise"

    def describe_activation(self) -> str:
        return f"A{self.bits} {self.mode}"

    def parts(self, x, owner=None):
        return uniform_parts(x, self.bits, self.mode, self._tensor_granularity, self.clip)

    def fake(self, x, owner=None):
        # dequantize(parts(x)) with the same arithmetic, in place on one fresh buffer
        return _fake_uniform(x, self.bits, self.mode, self._tensor_granularity, self.clip)

    def fake_with_codes(self, x, owner=None, layout=None):
        return uniform_with_codes(x, self.bits, self.mode, self._tensor_granularity, self.clip, layout)

    @staticmethod
    def dequantize(parts):
        if parts.kind == "symmetric":
            return parts.codes / parts.scale
        assert parts.offset is not None
        return parts.codes * parts.scale + parts.offset

    @staticmethod
    def encode(parts):
        codes = parts.codes + (2 ** (parts.bits - 1) - 1) if parts.kind == "symmetric" else parts.codes
        return codes.round().to(torch.uint8)

    @classmethod
    def decode(cls, kind, bits, codes, scale, offset):
        values = codes.to(scale.dtype)
        if kind == "symmetric":
            values = values - (2 ** (bits - 1) - 1)
        return cls.dequantize(QuantParts(kind, values, scale, offset, bits))


@register_method("lsq")
class LsqMethod(QuantMethod):
    """Learned Step Size Quantization (Esser et al., 2020) for activations, signed range ``[−Q_N, Q_P]``.

    ``x̂ = round(clamp(x/s, −Q_N, Q_P))·s`` with ``Q_N = 2^(b−1)``, ``Q_P = 2^(b−1) − 1`` (``mode`` must be
    ``"symmetric"``: no offset, zero maps to zero; no ``clip``: the range is the clamp). The step size
    ``s = step_init + step_delta`` (shape (1,)) lives on the owning :class:`~ds_kdqat.quant.modules.ActQuantizer`:
    ``step_init`` (buffer) is set once, on the first batch with ``mean|x| > 0``, to ``2·mean|x|/√Q_P``
    (averaged over data-parallel ranks when ``torch.distributed`` runs) and ``step_delta`` (parameter, starts
    at 0) is what the optimizer learns, so ``∂L/∂step_delta = ∂L/∂s``. The split keeps the initialisation
    when an optimizer works on its own copy of the parameters (DeepSpeed ZeRO, fp16/bf16 master weights).
    Gradients: straight-through for ``x`` inside the range, LSQ's ``∂x̂/∂s`` scaled by
    ``g = 1/√(N·Q_P)`` (``N`` = elements of ``x``) for ``s`` (see :func:`~ds_kdqat.quant.functional.lsq_quantize`).
    ``s`` is floored at the dtype's smallest normal number (stays positive; the gradient passes the floor).
    """

    act_bits = tuple(range(2, 17))
    kinds = ("lsq",)
    modes = ("symmetric",)
    supports_clip = False
    label = "LSQ"

    def attach(self, owner: nn.Module) -> None:
        # shape (1,), not (): DeepSpeed broadcasts parameters as byte views, which 0-dim tensors cannot give
        owner.register_buffer("step_init", torch.zeros(1))
        owner.step_delta = nn.Parameter(torch.zeros(1))

    @staticmethod
    def step(owner: nn.Module) -> torch.Tensor:
        """``s = step_init + step_delta`` (differentiable in ``step_delta``), at least the smallest normal
        number in the forward; the gradient passes that floor unchanged, so a step pushed onto it can recover."""
        step = owner.step_init + owner.step_delta
        tiny = torch.finfo(step.dtype).tiny
        return torch.where(step >= tiny, step, step - step.detach() + tiny)

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor, owner: nn.Module) -> None:
        if owner.__dict__.get("_step_ready"):  # checked once on the host, then remembered
            return
        if bool(owner.step_init > 0):  # e.g. loaded from a checkpoint
            owner.__dict__["_step_ready"] = True
            return
        init = lsq_initial_step(x, self.bits).to(owner.step_init.dtype)
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            init = init.to(owner.step_init.device)
            dist.all_reduce(init)  # SUM (AVG is not in gloo), then divide
            init /= dist.get_world_size()
        owner.step_init.copy_(init)
        owner.__dict__["_step_ready"] = bool(init > 0)

    def parts(self, x, owner=None):
        self._initialize(x, owner)
        return lsq_parts(x, self.step(owner), self.bits)

    def quantize(self, x, owner=None):
        self._initialize(x, owner)
        return lsq_quantize(x, self.step(owner).to(x.dtype), self.bits)

    def quantize_with_codes(self, x, owner=None, layout=None):
        x_hat = self.quantize(x, owner)
        return x_hat, lsq_codes(x_hat, self.step(owner), self.bits)

    @staticmethod
    def encode(parts):
        return (parts.codes + 2 ** (parts.bits - 1)).round().to(torch.uint8)

    @classmethod
    def decode(cls, kind, bits, codes, scale, offset):
        return cls.dequantize(QuantParts(kind, codes.to(scale.dtype) - 2 ** (bits - 1), scale, offset, bits))

    def export_state(self, owner):
        return {"step": self.step(owner).detach().float().cpu().reshape(())}

    @torch.no_grad()
    def import_state(self, owner, tensors):
        owner.step_init.copy_(tensors["step"].reshape(owner.step_init.shape))
        owner.step_delta.zero_()
        owner.__dict__["_step_ready"] = bool(owner.step_init > 0)


