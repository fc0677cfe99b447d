"""Write an :class:`~ds_kdqat.analysis.compare.AnalysisResult` and training curves as CSV, JSON and PNG.

Files (all written atomically) under the output directory, each by its metric in
:mod:`ds_kdqat.analysis.measures` (training curves here):

==============================  ===================================================================
``metrics.json``                summary: per compared model, per layer means of every metric; Hessian
``attention_heads.csv``         model, layer, head, cover_length_ratio, ranking_loss
``error_propagation.csv``       model, kind (layer_outputs / attention_outputs), layer, mse
``sa_distance.csv``             model, tokens (all / special token), layer, head, sa_gen, sa_prop
``attention_output_range.csv``  model, layer, position, min_mean, max_mean, count
``hessian.csv``                 model, rank, eigenvalue, iterations, converged, num_params
``cover_length_ratio.png``      cover length ratio per head (layer-major), one line per model
``ranking_loss.png``            ranking loss per head (layer-major), one line per model
``error_propagation.png``       MSE per layer of layer outputs and attention outputs
``sa_distance.png``             SA-GEN and SA-PROP distance per layer (head mean); ``sa_distance_<TOKEN>.png``
                                the same over the special token (e.g. ``sa_distance_SEP.png``)
``attention_output_range_L{l}.png``  min–max curves of ``Y_l`` per model
``attention_map_L{l}_H{h}.png`` heatmaps of the chosen example
``hessian.png``                 eigenvalues per model
``training_curves.png`` / ``dev_curves.png`` / ``curves_summary.csv``  from run logs
==============================  ===================================================================
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

from . import plots
from .curves import RunCurves, curve_summary
from .io import save_figure, write_csv, write_json
from .measures import METRICS
from .measures.base import Report
from .result import AnalysisResult


def write_analysis(result: AnalysisResult, out_dir: str | Path, range_layers: Sequence[int] = (),
                   extra: Optional[dict] = None) -> dict[str, Path]:
    """Write every file of the table above that ``result`` has data for; return name → path.

    Each metric of :data:`~ds_kdqat.analysis.measures.METRICS` writes its own files and its part of
    ``metrics.json`` (``models[m]`` entries, ``hessian``), which is written last.
    """
    out = Path(out_dir)
    summary = {"num_examples": result.num_examples, "num_layers": result.num_layers, "num_heads": result.num_heads,
               "cover_top_k": result.cover_top_k, **(extra or {}), "models": {}, "hessian": {}}
    report = Report(out, range_layers, summary)
    for metric in METRICS.values():
        metric.write(result, report)
    report.written["metrics.json"] = write_json(out / "metrics.json", summary)
    return report.written


def write_curves(logs: Mapping[str, RunCurves], out_dir: str | Path, fraction: float = 0.99) -> dict[str, Path]:
    """Training curves (train loss terms, dev metrics) of one or more runs, and a convergence summary."""
    out = Path(out_dir)
    written = {}
    for split, name, title in (("train", "training_curves.png", "loss terms (train)"),
                               ("dev", "dev_curves.png", "dev metrics")):
        if any(log.columns_of(split) for log in logs.values()):
            written[name] = save_figure(plots.training_curves(logs, split, title), out / name)
    rows = curve_summary(dict(logs), fraction)
    written["curves_summary.csv"] = write_csv(
        out / "curves_summary.csv",
        ["run", "phase", "split", "metric", "last", "best", "best_step", "steps_to_reach", "fraction"], rows)
    return written
