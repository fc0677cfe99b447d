"""Typed configuration of the quantization module (the ``kdqat.quant`` config section).

Resolution rule (one rule, no merging):

* ``preset`` names a ready placement (see :mod:`ds_kdqat.quant.presets`); the default ``"ternarybert"`` is
  TernaryBERT's W2-E2-A8 setting;
* ``groups``, when given (a list, possibly empty), REPLACES the preset's weight groups entirely;
* ``attention``, when given, REPLACES the preset's attention-activation settings entirely.

So ``{"preset": "ternarybert", "attention": {"bits": null}}`` is W2-E2 with 8-bit activations only at the
linear inputs, and ``{"groups": [...]}`` quantizes exactly the listed groups plus the preset's attention
quantization. A group selects modules by ``roles`` (names from :data:`ROLE_NAMES`: ``query``, ``key``,
``value``, ``attention_output_projection``, ``ffn_in``, ``ffn_out``, ``word_embedding``, ``pooler``), resolved
through the model's family adapter (:mod:`ds_kdqat.models.families`) when the model is quantized, and/or by
``patterns``: regular expressions searched (``re.search``) in the dotted module names of the model
(``bert.encoder.layer.0.attention.self.query``), for models or modules no role names. Every role and pattern
must match at least one module unless the group says ``optional: true`` (which also allows a role the family
lacks), and a module matched by two groups is an error. Presets use roles only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from ds_kdqat.configtools import from_dict, is_int
from ds_kdqat.errors import ConfigError
from ds_kdqat.models.families.base import ROLE_NAMES
from ds_kdqat.quant.methods import QUANT_METHODS, activation_methods, weight_methods
from ds_kdqat.quant.presets import PRESETS

Granularity = Literal["layer", "row"]
Mode = Literal["minmax", "symmetric"]
AttentionPoint = Literal["query", "key", "value", "map"]

GRANULARITIES = typing.get_args(Granularity)
MODES = typing.get_args(Mode)
ATTENTION_POINTS = typing.get_args(AttentionPoint)
DEFAULT_PATH = "kdqat.quant"


def _check_choice(value: Any, allowed: tuple, path: str) -> None:
    if value not in allowed:
        raise ConfigError(path, f"got {value!r}, expected one of {list(allowed)}")


def _check_clip(value: Any, path: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not value > 0:
        raise ConfigError(path, f"got {value!r}, expected a finite number > 0 or null (no clipping)")


def _check_bits(value: Any, allowed: tuple, path: str, what: str) -> None:
    if not is_int(value) or value not in allowed:
        raise ConfigError(path, f"got {value!r}, expected {what} in {allowed[0]}..{allowed[-1]}"
                          if len(allowed) > 1 else f"got {value!r}, expected {what} {allowed[0]}")


def _check_registered(value: Any, allowed: tuple[str, ...], path: str) -> None:
    """A method name from the registry (:data:`ds_kdqat.quant.methods.QUANT_METHODS`), in the Literal's wording."""
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(path, f"got {json.dumps(value)}; allowed: {', '.join(json.dumps(a) for a in allowed)}")


def _check_activation(method: Any, bits: Any, mode: Any, clip: Any, path: str, names: tuple[str, str, str, str]
                      ) -> None:
    """Validate one activation setting (method, bits, mode, clip) against its registered method; ``names`` are
    the four keys' names under ``path``."""
    _check_registered(method, activation_methods(), f"{path}.{names[0]}")
    cls = QUANT_METHODS[method]
    if bits is not None:
        _check_bits(bits, cls.act_bits, f"{path}.{names[1]}", "null (off) or an int")
    _check_choice(mode, MODES, f"{path}.{names[2]}")
    if mode not in cls.modes:
        raise ConfigError(f"{path}.{names[2]}", f"got {json.dumps(mode)}; method {json.dumps(method)} supports "
                          + ", ".join(json.dumps(m) for m in cls.modes))
    _check_clip(clip, f"{path}.{names[3]}")
    if clip is not None and not cls.supports_clip:
        raise ConfigError(f"{path}.{names[3]}", f"got {clip!r}; method {json.dumps(method)} takes no clip (null)")


@dataclass
class GroupConfig:
    """One group of modules quantized the same way.

    ``roles``: module roles (:data:`ROLE_NAMES`), resolved through the model's family adapter; ``patterns``:
    regexes over module names (at least one of the two non-empty); ``method``: a registered weight method
    (:mod:`ds_kdqat.quant.methods`): twn | lat (ternary, 2 bits) | binary (1 bit) | uniform (``bits`` 2..8,
    ``mode`` symmetric or minmax); ``bits`` None = the method's own (2, 2, 1, 8); ``granularity``: one scale
    per ``layer`` (matrix) or per ``row`` (dim 0); ``clip``: clamp weights to ±clip before quantizing (gradient
    zero outside). Activations at the input of each linear in the group: ``act_bits`` (None = not quantized;
    must be None for embeddings, whose input is token ids), ``act_method`` (a registered activation method:
    ``uniform``, the current batch's statistics with ``act_mode`` minmax or symmetric and ``act_clip``; or
    ``lsq``, a learned step size, with ``act_mode: "symmetric"`` and no clip). ``optional``: the group may
    match no module and name roles the family lacks (presets use it for parts some architectures lack, e.g. the
    word embedding of ViT or the pooler of DistilBERT).
    """

    patterns: list[str] = field(default_factory=list)
    roles: list[str] = field(default_factory=list)
    method: str = "twn"
    bits: Optional[int] = None
    granularity: Granularity = "layer"
    mode: Mode = "symmetric"
    clip: Optional[float] = None
    act_bits: Optional[int] = 8
    act_mode: Mode = "minmax"
    act_clip: Optional[float] = None
    act_method: str = "uniform"
    optional: bool = False

    @property
    def weight_bits(self) -> int:
        return self.bits if self.bits is not None else QUANT_METHODS[self.method].default_bits

    def validate(self, path: str = f"{DEFAULT_PATH}.groups[0]") -> None:
        if not isinstance(self.patterns, list):
            raise ConfigError(f"{path}.patterns", f"got {self.patterns!r}, expected a list of regexes")
        if not isinstance(self.roles, list):
            raise ConfigError(f"{path}.roles", f"got {json.dumps(self.roles, default=repr)}, expected a list of "
                              "role names: " + ", ".join(json.dumps(r) for r in ROLE_NAMES))
        if not self.patterns and not self.roles:
            raise ConfigError(f"{path}.patterns", f"got {self.patterns!r}, expected a non-empty list of regexes "
                              "(or a non-empty roles list: " + ", ".join(json.dumps(r) for r in ROLE_NAMES) + ")")
        for j, role in enumerate(self.roles):
            if not isinstance(role, str) or role not in ROLE_NAMES:
                raise ConfigError(f"{path}.roles[{j}]", f"got {json.dumps(role, default=repr)}; allowed: "
                                  + ", ".join(json.dumps(r) for r in ROLE_NAMES))
            if role in self.roles[:j]:
                raise ConfigError(f"{path}.roles[{j}]", f"got {json.dumps(role)} twice; name each role once")
        for j, pattern in enumerate(self.patterns):
            if not isinstance(pattern, str) or not pattern:
                raise ConfigError(f"{path}.patterns[{j}]", f"got {pattern!r}, expected a non-empty regex string")
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"{path}.patterns[{j}]", f"invalid regex {pattern!r}: {err}") from None
        _check_registered(self.method, weight_methods(), f"{path}.method")
        if self.bits is not None:
            allowed = QUANT_METHODS[self.method].weight_bits
            _check_bits(self.bits, allowed, f"{path}.bits", f"null or, for method {self.method!r},")
        _check_choice(self.granularity, GRANULARITIES, f"{path}.granularity")
        _check_choice(self.mode, MODES, f"{path}.mode")
        _check_clip(self.clip, f"{path}.clip")
        _check_activation(self.act_method, self.act_bits, self.act_mode, self.act_clip, path,
                          ("act_method", "act_bits", "act_mode", "act_clip"))
        if not isinstance(self.optional, bool):
            raise ConfigError(f"{path}.optional", f"got {self.optional!r}, expected true or false")


@dataclass
class AttentionActConfig:
    """Activation quantization before the two attention matmuls (Q·Kᵀ and map·V) of every self-attention.

    ``points``: any of query, key, value, map; ``bits`` None = off; ``method``/``mode``/``clip`` as
    ``act_method``/``act_mode``/``act_clip`` for linear inputs (one quantizer per point and layer; with
    ``lsq`` each learns its own step).
    """

    points: list[str] = field(default_factory=lambda: list(ATTENTION_POINTS))
    bits: Optional[int] = 8
    mode: Mode = "minmax"
    clip: Optional[float] = None
    method: str = "uniform"

    def validate(self, path: str = f"{DEFAULT_PATH}.attention") -> None:
        if not isinstance(self.points, list):
            raise ConfigError(f"{path}.points", f"got {self.points!r}, expected a list of {list(ATTENTION_POINTS)}")
        for j, point in enumerate(self.points):
            _check_choice(point, ATTENTION_POINTS, f"{path}.points[{j}]")
        if len(set(self.points)) != len(self.points):
            raise ConfigError(f"{path}.points", f"got {self.points!r}, expected each point at most once")
        _check_activation(self.method, self.bits, self.mode, self.clip, path, ("method", "bits", "mode", "clip"))


SecondMomentSource = Literal["optimizer", "own"]
SECOND_MOMENT_SOURCES = typing.get_args(SecondMomentSource)


@dataclass
class LatConfig:
    """Loss-aware ternarization settings (used by groups with ``method: lat``).

    ``second_moment``: where LAT's diagonal ``D = sqrt(v) + eps`` takes ``v`` from.

    * ``"optimizer"`` (default, as TernaryBERT): the optimizer's own second moment, Adam's ``exp_avg_sq``
      (BertAdam, AdamW, DeepSpeed's Adams; of the fp32 master copy with fp16/bf16; under ZeRO 1-3 gathered from
      the partitioned flat state), read after every applied step, as stored: without bias correction (BertAdam
      has none; for AdamW the correction is one factor per tensor, which moves α and b only through ``eps``).
      Where the optimizer keeps no element-wise second moment (SGD, Adafactor's factored one, DeepSpeed's
      fused-fp16 wrapper of FusedAdam) the quantizer falls back to ``"own"``, with a warning.
    * ``"own"``: an EMA kept by the quantizer from the gradient reaching the latent weight,
      ``v ← β2·v + (1−β2)·g²`` after every applied step (``beta2``; averaged over data-parallel ranks when
      ``sync_ranks``): Adam's recursion, but of the unclipped (and, with fp16, still loss-scaled) gradient.

    ``eps``: ``D = sqrt(v) + eps`` (BertAdam's default ``e``, so with BertAdam D is its update's denominator);
    ``iters``: most alternating rounds per quantization (fewer when ``b`` stops changing); ``beta2`` and
    ``sync_ranks``: the ``"own"`` estimate's (unused with the optimizer's).
    """

    second_moment: SecondMomentSource = "optimizer"
    beta2: float = 0.999
    eps: float = 1e-6
    iters: int = 10
    sync_ranks: bool = True

    def validate(self, path: str = f"{DEFAULT_PATH}.lat") -> None:
        if self.second_moment not in SECOND_MOMENT_SOURCES:
            raise ConfigError(f"{path}.second_moment", f"got {json.dumps(self.second_moment, default=repr)}; "
                              "allowed: " + ", ".join(json.dumps(s) for s in SECOND_MOMENT_SOURCES))
        if isinstance(self.beta2, bool) or not isinstance(self.beta2, (int, float)) or not 0 <= self.beta2 < 1:
            raise ConfigError(f"{path}.beta2", f"got {self.beta2!r}, expected a number in [0, 1)")
        if (isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not math.isfinite(self.eps)
                or not self.eps > 0):
            raise ConfigError(f"{path}.eps", f"got {self.eps!r}, expected a finite number > 0")
        if not is_int(self.iters) or not 1 <= self.iters <= 1000:
            raise ConfigError(f"{path}.iters", f"got {self.iters!r}, expected an int in 1..1000")
        if not isinstance(self.sync_ranks, bool):
            raise ConfigError(f"{path}.sync_ranks", f"got {self.sync_ranks!r}, expected true or false")


@dataclass
class QuantConfig:
    """The ``kdqat.quant`` section. Default: TernaryBERT W2-E2-A8 (see the module docstring for overrides).

    ``integer_forward``: the quantized linears' training forward computes ``x̂·ŵᵀ`` as an int8 × int8 → int32
    GEMM of the codes (:mod:`ds_kdqat.quant.integer`; CPU only) instead of an fp32 GEMM of the fake-quantized
    tensors: exact sums (the outputs differ from fake quant by float rounding, as the int8 deployment backend's
    do) and a faster forward; the backward and the evaluation forward are unchanged. For linears with 8-bit (or
    narrower) activation codes and shift-free weight codes (ternary, binary, symmetric uniform); others keep the
    float product.
    """

    preset: str = "ternarybert"
    groups: Optional[list[GroupConfig]] = None
    attention: Optional[AttentionActConfig] = None
    lat: LatConfig = field(default_factory=LatConfig)
    integer_forward: bool = False

    def validate(self, path: str = DEFAULT_PATH) -> None:
        _check_choice(self.preset, tuple(PRESETS), f"{path}.preset")
        if not isinstance(self.integer_forward, bool):
            raise ConfigError(f"{path}.integer_forward", f"got {self.integer_forward!r}, expected true or false")
        if self.groups is not None:
            if not isinstance(self.groups, list):
                raise ConfigError(f"{path}.groups", f"got {self.groups!r}, expected a list of groups or null")
            for i, group in enumerate(self.groups):
                if not isinstance(group, GroupConfig):
                    raise ConfigError(f"{path}.groups[{i}]", f"got {type(group).__name__}, expected a group object")
                group.validate(f"{path}.groups[{i}]")
        if self.attention is not None:
            if not isinstance(self.attention, AttentionActConfig):
                raise ConfigError(f"{path}.attention", f"got {type(self.attention).__name__}, expected an object")
            self.attention.validate(f"{path}.attention")
        if not isinstance(self.lat, LatConfig):
            raise ConfigError(f"{path}.lat", f"got {type(self.lat).__name__}, expected an object")
        self.lat.validate(f"{path}.lat")

    def resolved(self) -> "ResolvedQuant":
        """The groups and attention settings in force: the preset's, replaced by explicit ones."""
        base = PRESETS[self.preset]()
        where = f"{DEFAULT_PATH}.preset[{self.preset}]"
        explicit_groups = self.groups is not None
        return ResolvedQuant(
            groups=list(self.groups) if explicit_groups else
            [from_dict(GroupConfig, group, f"{where}.groups[{i}]") for i, group in enumerate(base.groups)],
            attention=self.attention if self.attention is not None else
            from_dict(AttentionActConfig, base.attention, f"{where}.attention"),
            groups_path="groups" if explicit_groups else f"preset[{self.preset}].groups",
            lat=self.lat,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class ResolvedQuant:
    groups: list[GroupConfig]
    attention: AttentionActConfig
    groups_path: str  # how error messages name the group list
    lat: LatConfig


def quant_config_from_dict(data: Any, path: str = DEFAULT_PATH) -> QuantConfig:
    """Parse and validate a ``kdqat.quant`` dict (also what a packed export's manifest stores)."""
    return from_dict(QuantConfig, {} if data is None else data, path)
