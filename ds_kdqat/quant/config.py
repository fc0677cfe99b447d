"""Typed configuration of the quantization module (the ``kdqat.quant`` config section).

Resolution rule (one rule, no merging):

* ``preset`` names a ready placement (see :mod:`ds_kdqat.quant.presets`); the default ``"ternarybert"`` is
  TernaryBERT's W2-E2-A8 setting;
* ``groups``, when given (a list, possibly empty), REPLACES the preset's weight groups entirely;
* ``attention``, when given, REPLACES the preset's attention-activation settings entirely.

So ``{"preset": "ternarybert", "attention": {"bits": null}}`` is W2-E2 with 8-bit activations only at the
linear inputs, and ``{"groups": [...]}`` quantizes exactly the listed groups plus the preset's attention
quantization. Each group's ``patterns`` are regular expressions searched (``re.search``) in the dotted module
names of the model (``bert.encoder.layer.0.attention.self.query``); every pattern must match at least one
module unless the group says ``optional: true``, and a module matched by two groups is an error.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from ds_kdqat.configtools import is_int
from ds_kdqat.errors import ConfigError

Method = Literal["twn", "lat", "binary", "uniform"]
Granularity = Literal["layer", "row"]
Mode = Literal["minmax", "symmetric"]
AttentionPoint = Literal["query", "key", "value", "map"]

METHODS = typing.get_args(Method)
GRANULARITIES = typing.get_args(Granularity)
MODES = typing.get_args(Mode)
ATTENTION_POINTS = typing.get_args(AttentionPoint)
# bits each method stores per weight; uniform takes 2..8 (codes are packed into bytes at export)
METHOD_BITS = {"twn": (2,), "lat": (2,), "binary": (1,), "uniform": tuple(range(2, 9))}
METHOD_DEFAULT_BITS = {"twn": 2, "lat": 2, "binary": 1, "uniform": 8}
ACT_BITS = tuple(range(2, 17))
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


@dataclass
class GroupConfig:
    """One group of modules quantized the same way.

    ``patterns``: regexes over module names; ``method``: twn | lat (ternary, 2 bits) | binary (1 bit) |
    uniform (``bits`` 2..8, ``mode`` symmetric or minmax); ``bits`` None = the method's own (2, 2, 1, 8);
    ``granularity``: one scale per ``layer`` (matrix) or per ``row`` (dim 0); ``clip``: clamp weights to ±clip
    before quantizing (gradient zero outside). Activations at the input of each linear in the group:
    ``act_bits`` (None = not quantized), ``act_mode``, ``act_clip``; must be None for embeddings (their
    input is token ids). ``optional``: the group may match no module (presets use it for parts some
    architectures lack, e.g. the word embedding of ViT).
    """

    patterns: list[str] = field(default_factory=list)
    method: Method = "twn"
    bits: Optional[int] = None
    granularity: Granularity = "layer"
    mode: Mode = "symmetric"
    clip: Optional[float] = None
    act_bits: Optional[int] = 8
    act_mode: Mode = "minmax"
    act_clip: Optional[float] = None
    optional: bool = False

    @property
    def weight_bits(self) -> int:
        return self.bits if self.bits is not None else METHOD_DEFAULT_BITS[self.method]

    def validate(self, path: str = f"{DEFAULT_PATH}.groups[0]") -> None:
        if not isinstance(self.patterns, list) or not self.patterns:
            raise ConfigError(f"{path}.patterns", f"got {self.patterns!r}, expected a non-empty list of regexes")
        for j, pattern in enumerate(self.patterns):
            if not isinstance(pattern, str) or not pattern:
                raise ConfigError(f"{path}.patterns[{j}]", f"got {pattern!r}, expected a non-empty regex string")
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"{path}.patterns[{j}]", f"invalid regex {pattern!r}: {err}") from None
        _check_choice(self.method, METHODS, f"{path}.method")
        if self.bits is not None:
            allowed = METHOD_BITS[self.method]
            _check_bits(self.bits, allowed, f"{path}.bits", f"null or, for method {self.method!r},")
        _check_choice(self.granularity, GRANULARITIES, f"{path}.granularity")
        _check_choice(self.mode, MODES, f"{path}.mode")
        _check_clip(self.clip, f"{path}.clip")
        if self.act_bits is not None:
            _check_bits(self.act_bits, ACT_BITS, f"{path}.act_bits", "null (off) or an int")
        _check_choice(self.act_mode, MODES, f"{path}.act_mode")
        _check_clip(self.act_clip, f"{path}.act_clip")
        if not isinstance(self.optional, bool):
            raise ConfigError(f"{path}.optional", f"got {self.optional!r}, expected true or false")


@dataclass
class AttentionActConfig:
    """Activation quantization before the two attention matmuls (Q·Kᵀ and map·V) of every self-attention.

    ``points``: any of query, key, value, map; ``bits`` None = off; ``mode``/``clip`` as for linear inputs.
    """

    points: list[str] = field(default_factory=lambda: list(ATTENTION_POINTS))
    bits: Optional[int] = 8
    mode: Mode = "minmax"
    clip: Optional[float] = None

    def validate(self, path: str = f"{DEFAULT_PATH}.attention") -> None:
        if not isinstance(self.points, list):
            raise ConfigError(f"{path}.points", f"got {self.points!r}, expected a list of {list(ATTENTION_POINTS)}")
        for j, point in enumerate(self.points):
            _check_choice(point, ATTENTION_POINTS, f"{path}.points[{j}]")
        if len(set(self.points)) != len(self.points):
            raise ConfigError(f"{path}.points", f"got {self.points!r}, expected each point at most once")
        if self.bits is not None:
            _check_bits(self.bits, ACT_BITS, f"{path}.bits", "null (off) or an int")
        _check_choice(self.mode, MODES, f"{path}.mode")
        _check_clip(self.clip, f"{path}.clip")


@dataclass
class LatConfig:
    """Loss-aware ternarization settings (used by groups with ``method: lat``).

    ``beta2``: decay of the second-moment EMA ``v ← β2·v + (1−β2)·g²`` (Adam's β2); ``eps``: ``D = sqrt(v) + eps``;
    ``iters``: most alternating rounds per forward; ``sync_ranks``: average the accumulated gradient over the
    data-parallel ranks before folding it into ``v`` (so every rank holds the same ``v``, the one Adam holds).
    """

    beta2: float = 0.999
    eps: float = 1e-6
    iters: int = 10
    sync_ranks: bool = True

    def validate(self, path: str = f"{DEFAULT_PATH}.lat") -> None:
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
    """The ``kdqat.quant`` section. Default: TernaryBERT W2-E2-A8 (see the module docstring for overrides)."""

    preset: str = "ternarybert"
    groups: Optional[list[GroupConfig]] = None
    attention: Optional[AttentionActConfig] = None
    lat: LatConfig = field(default_factory=LatConfig)

    def validate(self, path: str = DEFAULT_PATH) -> None:
        from ds_kdqat.quant.presets import PRESETS

        _check_choice(self.preset, tuple(PRESETS), f"{path}.preset")
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
        from ds_kdqat.quant.presets import PRESETS

        base = PRESETS[self.preset]()
        explicit_groups = self.groups is not None
        return ResolvedQuant(
            groups=list(self.groups) if explicit_groups else base.groups,
            attention=self.attention if self.attention is not None else base.attention,
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
    from ds_kdqat.configtools import from_dict

    return from_dict(QuantConfig, {} if data is None else data, path)
