"""What :func:`ds_kdqat.analysis.compare.analyze` returns: every metric's values as numpy arrays."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class HessianSummary:
    """Top Hessian eigenvalues of one model (largest magnitude first), with each one's power-iteration count
    and convergence flag, and the number of parameters the Hessian is taken over."""

    values: list[float]
    iterations: list[int]
    converged: list[bool]
    num_params: int


@dataclass
class AnalysisResult:
    """Everything ``analyze`` measured, as numpy arrays (L layers, H heads, S positions); each field is
    filled by one metric of :mod:`ds_kdqat.analysis.measures`.

    ``heads[model][metric]`` (L, H) for ``cover_length_ratio`` / ``ranking_loss``;
    ``mse[model][kind]`` for ``layer_outputs`` (L+1,) and ``attention_outputs`` (L,);
    ``sa[model][tokens][kind]`` (L, H), tokens ``all`` or the special token, kind ``sa_gen`` / ``sa_prop``;
    ``ranges[model]`` = (min mean (L, S), max mean (L, S), count (S,));
    ``heatmaps[(layer, head)][model]`` (n, n) for the chosen example, whose tokens are ``heatmap_tokens``.
    """

    num_examples: int = 0
    num_layers: int = 0
    num_heads: int = 0
    cover_top_k: int = 0
    heads: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    mse: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    sa: dict[str, dict[str, dict[str, np.ndarray]]] = field(default_factory=dict)
    ranges: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)
    heatmaps: dict[tuple[int, int], dict[str, np.ndarray]] = field(default_factory=dict)
    heatmap_tokens: list[str] = field(default_factory=list)
    hessian: dict[str, HessianSummary] = field(default_factory=dict)
