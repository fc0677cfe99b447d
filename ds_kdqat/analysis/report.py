"""Write an :class:`~ds_kdqat.analysis.compare.AnalysisResult` and training curves as CSV, JSON and PNG.

Files (all written atomically) under the output directory:

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

import numpy as np

from . import plots
from .compare import AnalysisResult
from .curves import RunLog, curve_summary
from .io import save_figure, write_csv, write_json


def _f(value) -> Optional[float]:
    value = float(value)
    return None if np.isnan(value) else value


def write_analysis(result: AnalysisResult, out_dir: str | Path, range_layers: Sequence[int] = (),
                   extra: Optional[dict] = None) -> dict[str, Path]:
    """Write every file of the table above that ``result`` has data for; return name → path."""
    out = Path(out_dir)
    written: dict[str, Path] = {}
    layers, heads = result.num_layers, result.num_heads

    rows = [{"model": m, "layer": l, "head": h, "cover_length_ratio": _f(v["cover_length_ratio"][l, h]),
             "ranking_loss": _f(v["ranking_loss"][l, h])}
            for m, v in result.heads.items() for l in range(layers) for h in range(heads)]
    written["attention_heads.csv"] = write_csv(out / "attention_heads.csv",
                                               ["model", "layer", "head", "cover_length_ratio", "ranking_loss"], rows)
    rows = [{"model": m, "kind": kind, "layer": l, "mse": _f(x)}
            for m, kinds in result.mse.items() for kind, values in kinds.items() for l, x in enumerate(values)]
    written["error_propagation.csv"] = write_csv(out / "error_propagation.csv", ["model", "kind", "layer", "mse"], rows)
    rows = [{"model": m, "tokens": tokens, "layer": l, "head": h, "sa_gen": _f(v["sa_gen"][l, h]),
             "sa_prop": _f(v["sa_prop"][l, h])}
            for m, by_tokens in result.sa.items() for tokens, v in by_tokens.items()
            for l in range(layers) for h in range(heads)]
    written["sa_distance.csv"] = write_csv(out / "sa_distance.csv",
                                           ["model", "tokens", "layer", "head", "sa_gen", "sa_prop"], rows)
    rows = [{"model": m, "layer": l, "position": p, "min_mean": _f(low[l, p]), "max_mean": _f(high[l, p]),
             "count": int(count[p])}
            for m, (low, high, count) in result.ranges.items() for l in range(low.shape[0])
            for p in range(low.shape[1]) if count[p] > 0]
    written["attention_output_range.csv"] = write_csv(
        out / "attention_output_range.csv", ["model", "layer", "position", "min_mean", "max_mean", "count"], rows)
    if result.hessian:
        rows = [{"model": m, "rank": r + 1, "eigenvalue": v, "iterations": s.iterations[r],
                 "converged": s.converged[r], "num_params": s.num_params}
                for m, s in result.hessian.items() for r, v in enumerate(s.values)]
        written["hessian.csv"] = write_csv(out / "hessian.csv",
                                           ["model", "rank", "eigenvalue", "iterations", "converged", "num_params"], rows)

    summary = {
        "num_examples": result.num_examples, "num_layers": layers, "num_heads": heads,
        "cover_top_k": result.cover_top_k, **(extra or {}),
        "models": {
            m: {
                "cover_length_ratio_per_layer": [_f(x) for x in result.heads[m]["cover_length_ratio"].mean(axis=1)],
                "ranking_loss_per_layer": [_f(x) for x in result.heads[m]["ranking_loss"].mean(axis=1)],
                "mse_layer_outputs": [_f(x) for x in result.mse[m]["layer_outputs"]],
                "mse_attention_outputs": [_f(x) for x in result.mse[m]["attention_outputs"]],
                "sa_distance_per_layer": {tokens: {kind: [_f(x) for x in v[kind].mean(axis=1)] for kind in v}
                                          for tokens, v in result.sa[m].items()},
            }
            for m in result.heads
        },
        "hessian": {m: {"eigenvalues": s.values, "iterations": s.iterations, "converged": s.converged,
                        "num_params": s.num_params} for m, s in result.hessian.items()},
    }
    written["metrics.json"] = write_json(out / "metrics.json", summary)

    if result.heads:
        for metric, label in (("cover_length_ratio", "cover length ratio"), ("ranking_loss", "ranking loss")):
            figure = plots.per_head({m: v[metric] for m, v in result.heads.items()}, label,
                                    f"{label} per head vs teacher" + (f" (top-{result.cover_top_k})"
                                                                      if metric == "cover_length_ratio" else ""))
            written[f"{metric}.png"] = save_figure(figure, out / f"{metric}.png")
        figure = plots.per_layer({
            "MSE of layer outputs X_l": {m: v["layer_outputs"] for m, v in result.mse.items()},
            "MSE of attention outputs Y_l": {m: v["attention_outputs"] for m, v in result.mse.items()},
        }, first_layer={"MSE of attention outputs Y_l": 1})
        written["error_propagation.png"] = save_figure(figure, out / "error_propagation.png")
        for tokens in next(iter(result.sa.values())):
            figure = plots.per_layer({
                f"SA-GEN distance ({tokens})": {m: v[tokens]["sa_gen"].mean(axis=1) for m, v in result.sa.items()},
                f"SA-PROP distance ({tokens})": {m: v[tokens]["sa_prop"].mean(axis=1) for m, v in result.sa.items()},
            })
            safe = "".join(c if c.isalnum() else "_" for c in tokens).strip("_") or "special"
            name = "sa_distance.png" if tokens == "all" else f"sa_distance_{safe}.png"
            written[name] = save_figure(figure, out / name)
    for layer in (range_layers or range(layers)):
        if layer >= layers:
            continue
        profiles = {m: (low[layer], high[layer]) for m, (low, high, count) in result.ranges.items()}
        figure = plots.minmax_curves(profiles, f"per-token min–max of attention output Y (layer {layer})")
        written[f"attention_output_range_L{layer}.png"] = save_figure(figure, out / f"attention_output_range_L{layer}.png")
    for (layer, head), maps in sorted(result.heatmaps.items()):
        figure = plots.attention_heatmaps(maps, result.heatmap_tokens, f"attention map, layer {layer}, head {head}")
        written[f"attention_map_L{layer}_H{head}.png"] = save_figure(figure, out / f"attention_map_L{layer}_H{head}.png")
    if result.hessian:
        figure = plots.eigenvalue_bars({m: s.values for m, s in result.hessian.items()})
        written["hessian.png"] = save_figure(figure, out / "hessian.png")
    return written


def write_curves(logs: Mapping[str, RunLog], out_dir: str | Path, fraction: float = 0.99) -> dict[str, Path]:
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
