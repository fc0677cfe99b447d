"""What an analysis computes: :class:`AnalysisConfig` (with its :class:`HessianConfig`), read by
``ds-kdqat analyze --config/--set``; every field is checked by ``validate`` (a :class:`ConfigError` names the key)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

from ..errors import ConfigError

ModelName = Literal["teacher", "quantized", "student"]
MODEL_NAMES = ("teacher", "quantized", "student")


def _check_layers(values: Sequence[int], path: str) -> None:
    for i, value in enumerate(values):
        if value < 0:
            raise ConfigError(f"{path}[{i}]", f"got {value}; layer/head indices start at 0")


@dataclass
class HessianConfig:
    """Power iteration on Hessian-vector products (see :mod:`ds_kdqat.analysis.hessian`)."""

    enabled: bool = True
    models: list[ModelName] = field(default_factory=lambda: list(MODEL_NAMES))
    num_eigenvalues: int = 1
    max_iter: int = 50
    tol: float = 1e-3
    batches: int = 1
    params: Literal["all", "encoder"] = "all"
    seed: int = 0

    def validate(self, path: str = "analysis.hessian") -> None:
        for i, name in enumerate(self.models):
            if name not in MODEL_NAMES:
                raise ConfigError(f"{path}.models[{i}]", f"got {name!r}; allowed: {', '.join(MODEL_NAMES)}")
        for name in ("num_eigenvalues", "max_iter", "batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{path}.{name}", f"got {getattr(self, name)}; must be >= 1")
        if not self.tol > 0:
            raise ConfigError(f"{path}.tol", f"got {self.tol}; must be > 0")
        if self.params not in ("all", "encoder"):
            raise ConfigError(f"{path}.params", f"got {self.params!r}; allowed: all, encoder")


@dataclass
class AnalysisConfig:
    """What ``run/analyze.py`` computes. ``cover_top_k``: K of the cover length; ``ranking_margin``: the
    hinge margin of the ranking loss (0 as in the paper); ``max_examples``: null = the whole split;
    ``special_token``: token whose SA-GEN/SA-PROP distances are reported besides all tokens (null = none);
    ``heatmap_*``: which example, layers (empty = all) and heads get attention-map heatmaps;
    ``range_layers``: layers whose min–max curves are plotted (empty = all; the CSV has all)."""

    cover_top_k: int = 5
    ranking_margin: float = 0.0
    batch_size: int = 16
    max_examples: Optional[int] = 256
    special_token: Optional[str] = "[SEP]"
    heatmap_example: int = 0
    heatmap_layers: list[int] = field(default_factory=list)
    heatmap_heads: list[int] = field(default_factory=lambda: [0])
    range_layers: list[int] = field(default_factory=list)
    hessian: HessianConfig = field(default_factory=HessianConfig)

    def validate(self, path: str = "analysis") -> None:
        if self.cover_top_k < 1:
            raise ConfigError(f"{path}.cover_top_k", f"got {self.cover_top_k}; must be >= 1")
        if self.ranking_margin < 0:
            raise ConfigError(f"{path}.ranking_margin", f"got {self.ranking_margin}; must be >= 0")
        if self.batch_size < 1:
            raise ConfigError(f"{path}.batch_size", f"got {self.batch_size}; must be >= 1")
        if self.max_examples is not None and self.max_examples < 1:
            raise ConfigError(f"{path}.max_examples", f"got {self.max_examples}; must be >= 1 or null")
        if self.special_token is not None and not self.special_token:
            raise ConfigError(f"{path}.special_token", "must be a token string or null")
        if self.heatmap_example < 0:
            raise ConfigError(f"{path}.heatmap_example", f"got {self.heatmap_example}; must be >= 0")
        _check_layers(self.heatmap_layers, f"{path}.heatmap_layers")
        _check_layers(self.heatmap_heads, f"{path}.heatmap_heads")
        _check_layers(self.range_layers, f"{path}.range_layers")
        self.hessian.validate(f"{path}.hessian")
