"""Cover length ratio and ranking loss per (layer, head) of each compared model against the teacher.

Reduction: per (layer, head), the mean over all real query rows of all examples (see
:mod:`ds_kdqat.analysis.attention_metrics`). Result: ``heads[model][kind]`` (L, H).
Files: ``attention_heads.csv`` (model, layer, head, cover_length_ratio, ranking_loss), ``cover_length_ratio.png``,
``ranking_loss.png``; ``metrics.json``: ``<kind>_per_layer`` (head means) per model.
"""

from __future__ import annotations

import torch

from .. import plots
from ..attention_metrics import cover_length_ratio, pairwise_ranking_loss
from ..result import AnalysisResult
from .base import Report, RunningMeans, Setup, Step, finite_or_none

KINDS = ("cover_length_ratio", "ranking_loss")
LABELS = {"cover_length_ratio": "cover length ratio", "ranking_loss": "ranking loss"}


class AttentionHeads:
    def __init__(self, setup: Setup):
        self.compared = setup.compared
        self.top_k, self.margin = setup.config.cover_top_k, setup.config.ranking_margin
        self.sums = RunningMeans()

    def add(self, step: Step) -> None:
        teacher = step.taps["teacher"]
        for name in self.compared:
            for layer in range(step.layers):
                t_map, s_map = teacher.attention_maps[layer], step.taps[name].attention_maps[layer]
                cover = cover_length_ratio(t_map, s_map, step.mask, self.top_k)
                ranking = pairwise_ranking_loss(t_map, s_map, step.mask, self.margin)
                for kind, rows in zip(KINDS, (cover, ranking)):
                    valid = ~torch.isnan(rows)
                    self.sums.add((name, kind, layer), torch.nansum(rows, dim=(0, 2)), valid.sum(dim=(0, 2)))

    def finish(self, result: AnalysisResult) -> None:
        for name in self.compared:
            result.heads[name] = {kind: self.sums.per_layer((name, kind), result.num_layers) for kind in KINDS}


def write(result: AnalysisResult, report: Report) -> None:
    rows = [{"model": m, "layer": l, "head": h, **{kind: finite_or_none(v[kind][l, h]) for kind in KINDS}}
            for m, v in result.heads.items() for l in range(result.num_layers) for h in range(result.num_heads)]
    report.csv("attention_heads.csv", ["model", "layer", "head", *KINDS], rows)
    for m, v in result.heads.items():
        report.model_summary(m).update(
            {f"{kind}_per_layer": [finite_or_none(x) for x in v[kind].mean(axis=1)] for kind in KINDS})
    if result.heads:
        for kind in KINDS:
            label = LABELS[kind]
            title = f"{label} per head vs teacher" + (f" (top-{result.cover_top_k})" if kind == "cover_length_ratio" else "")
            report.png(f"{kind}.png", plots.per_head({m: v[kind] for m, v in result.heads.items()}, label, title))
