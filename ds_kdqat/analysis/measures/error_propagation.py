"""Error propagation: teacher–model MSE of the layer outputs ``X_0..X_L`` and the attention outputs ``Y_1..Y_L``.

Reduction: squared error summed over the real tokens and features of all examples, over their count (see
:mod:`ds_kdqat.analysis.propagation`). Result: ``mse[model][kind]``, (L+1,) for ``layer_outputs`` and (L,) for
``attention_outputs``. Files: ``error_propagation.csv`` (model, kind, layer, mse), ``error_propagation.png``;
``metrics.json``: ``mse_<kind>`` per model.
"""

from __future__ import annotations

from .. import plots
from ..propagation import squared_error_sums
from ..result import AnalysisResult
from .base import Report, RunningMeans, Setup, Step, finite_or_none

KINDS = ("layer_outputs", "attention_outputs")


class ErrorPropagation:
    def __init__(self, setup: Setup):
        self.compared = setup.compared
        self.sums = RunningMeans()

    def add(self, step: Step) -> None:
        teacher = step.taps["teacher"]
        for name in self.compared:
            for kind in KINDS:
                total, count = squared_error_sums(getattr(teacher, kind), getattr(step.taps[name], kind), step.mask)
                self.sums.add((name, kind), total, count)

    def finish(self, result: AnalysisResult) -> None:
        for name in self.compared:
            result.mse[name] = {kind: self.sums.mean((name, kind)) for kind in KINDS}


def write(result: AnalysisResult, report: Report) -> None:
    rows = [{"model": m, "kind": kind, "layer": l, "mse": finite_or_none(x)}
            for m, kinds in result.mse.items() for kind, values in kinds.items() for l, x in enumerate(values)]
    report.csv("error_propagation.csv", ["model", "kind", "layer", "mse"], rows)
    for m, v in result.mse.items():
        report.model_summary(m).update({f"mse_{kind}": [finite_or_none(x) for x in v[kind]] for kind in KINDS})
    if result.mse:
        figure = plots.per_layer({
            "MSE of layer outputs X_l": {m: v["layer_outputs"] for m, v in result.mse.items()},
            "MSE of attention outputs Y_l": {m: v["attention_outputs"] for m, v in result.mse.items()},
        }, first_layer={"MSE of attention outputs Y_l": 1})
        report.png("error_propagation.png", figure)
