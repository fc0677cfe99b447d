"""Attention-output range: per (layer, position), the mean over examples of the per-token min and max of ``Y_l``.

Every model, the teacher included; a position counts only for the examples where it is a real token (see
:mod:`ds_kdqat.analysis.ranges`). Result: ``ranges[model]`` = (min mean (L, S), max mean (L, S), count (S,)).
Files: ``attention_output_range.csv`` (model, layer, position, min_mean, max_mean, count; positions with a
real token) and ``attention_output_range_L{l}.png`` for each layer of ``range_layers`` (all when empty).
"""

from __future__ import annotations

import numpy as np
import torch

from .. import plots
from ..ranges import position_range_sums
from ..result import AnalysisResult
from .base import Report, Setup, Step, finite_or_none


class _PositionSum:
    """Per-position sums over batches of different padded lengths (the arrays grow to the longest)."""

    def __init__(self, layers: int):
        self.low = np.zeros((layers, 0))
        self.high = np.zeros((layers, 0))
        self.count = np.zeros(0)

    def _grow(self, length: int) -> None:
        extra = length - self.count.shape[0]
        if extra > 0:
            self.low = np.pad(self.low, ((0, 0), (0, extra)))
            self.high = np.pad(self.high, ((0, 0), (0, extra)))
            self.count = np.pad(self.count, (0, extra))

    def add(self, layer: int, low: torch.Tensor, high: torch.Tensor, count: torch.Tensor, first_layer: bool) -> None:
        self._grow(low.shape[0])
        n = low.shape[0]
        self.low[layer, :n] += low.double().cpu().numpy()
        self.high[layer, :n] += high.double().cpu().numpy()
        if first_layer:
            self.count[:n] += count.double().cpu().numpy()

    def means(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.low / self.count, self.high / self.count, self.count


class OutputRanges:
    def __init__(self, setup: Setup):
        self.names = list(setup.models)
        self.positions: dict[str, _PositionSum] = {}

    def add(self, step: Step) -> None:
        for name in self.names:
            sums = self.positions.setdefault(name, _PositionSum(step.layers))
            for layer, y in enumerate(step.taps[name].attention_outputs):
                low, high, count = position_range_sums(y, step.mask)
                sums.add(layer, low, high, count, first_layer=layer == 0)

    def finish(self, result: AnalysisResult) -> None:
        for name, sums in self.positions.items():
            result.ranges[name] = sums.means()


def write(result: AnalysisResult, report: Report) -> None:
    rows = [{"model": m, "layer": l, "position": p, "min_mean": finite_or_none(low[l, p]),
             "max_mean": finite_or_none(high[l, p]), "count": int(count[p])}
            for m, (low, high, count) in result.ranges.items() for l in range(low.shape[0])
            for p in range(low.shape[1]) if count[p] > 0]
    report.csv("attention_output_range.csv", ["model", "layer", "position", "min_mean", "max_mean", "count"], rows)
    layers = result.num_layers
    for layer in (report.range_layers or range(layers)):
        if layer >= layers:
            continue
        profiles = {m: (low[layer], high[layer]) for m, (low, high, count) in result.ranges.items()}
        figure = plots.minmax_curves(profiles, f"per-token min–max of attention output Y (layer {layer})")
        report.png(f"attention_output_range_L{layer}.png", figure)
