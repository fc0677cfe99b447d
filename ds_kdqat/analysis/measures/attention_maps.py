"""Attention-map heatmaps of one example (``config.heatmap_example``, counted over the whole split).

For each layer of ``heatmap_layers`` (all when empty) and head of ``heatmap_heads``, every model's (n, n)
map over the example's n real tokens. Result: ``heatmaps[(layer, head)][model]`` and ``heatmap_tokens``
(the example's tokens, from ``id_to_token`` or the ids). Files: ``attention_map_L{l}_H{h}.png``.
A layer/head outside the model, or an example index past the analysed ones, is a :class:`ConfigError`.
"""

from __future__ import annotations

import numpy as np

from ...errors import ConfigError
from .. import plots
from ..result import AnalysisResult
from .base import Report, Setup, Step


class AttentionMaps:
    def __init__(self, setup: Setup):
        self.names, self.config, self.id_to_token = list(setup.models), setup.config, setup.id_to_token
        self.maps: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        self.tokens: list[str] = []

    def add(self, step: Step) -> None:
        example = self.config.heatmap_example - step.first
        if not 0 <= example < step.size:
            return
        n = int(step.mask[example].sum())
        for layer in self.config.heatmap_layers or list(range(step.layers)):
            for head in self.config.heatmap_heads:
                if layer >= step.layers or head >= step.heads:
                    raise ConfigError("analysis.heatmap_layers" if layer >= step.layers else "analysis.heatmap_heads",
                                      f"layer {layer} / head {head} is outside the model "
                                      f"({step.layers} layers, {step.heads} heads)")
                self.maps[(layer, head)] = {
                    name: step.taps[name].attention_maps[layer][example, head, :n, :n].float().cpu().numpy()
                    for name in self.names}
        ids = step.batch["input_ids"][example, :n].tolist()
        self.tokens = self.id_to_token(ids) if self.id_to_token else [str(i) for i in ids]

    def finish(self, result: AnalysisResult) -> None:
        if self.config.heatmap_example >= result.num_examples:
            raise ConfigError("analysis.heatmap_example",
                              f"got {self.config.heatmap_example}; only {result.num_examples} examples were analyzed")
        result.heatmaps, result.heatmap_tokens = self.maps, self.tokens


def write(result: AnalysisResult, report: Report) -> None:
    for (layer, head), maps in sorted(result.heatmaps.items()):
        figure = plots.attention_heatmaps(maps, result.heatmap_tokens, f"attention map, layer {layer}, head {head}")
        report.png(f"attention_map_L{layer}_H{head}.png", figure)
