"""Figures of the analysis, drawn on plain arrays.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot), so nothing depends on or changes the
process-wide backend; :func:`ds_kdqat.analysis.io.save_figure` renders them to PNG with Agg. Each function
returns the figure; none reads files or tensors from models.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .curves import RunCurves

MODEL_COLOURS = {"teacher": "black", "quantized": "tab:red", "student": "tab:blue"}


def _colour(name: str, index: int) -> str:
    return MODEL_COLOURS.get(name, f"C{index % 10}")


def attention_heatmaps(maps: Mapping[str, np.ndarray], tokens: Sequence[str], title: str) -> Figure:
    """One panel per model of an (n, n) attention map (rows: queries, columns: keys), shared colour scale."""
    figure = Figure(figsize=(4.2 * len(maps), 4.0))
    axes = figure.subplots(1, len(maps), squeeze=False)[0]
    vmax = max(float(np.max(m)) for m in maps.values()) if maps else 1.0
    image = None
    for ax, (name, matrix) in zip(axes, maps.items()):
        image = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_title(name)
        if len(tokens) <= 40:
            ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=6)
            ax.set_yticks(range(len(tokens)), tokens, fontsize=6)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    if image is not None:
        figure.colorbar(image, ax=list(axes), shrink=0.8)
    figure.suptitle(title)
    return figure


def per_head(values: Mapping[str, np.ndarray], ylabel: str, title: str) -> Figure:
    """Per-head metric, heads of all layers along x (layer-major), one line per model; (L, H) arrays."""
    figure = Figure(figsize=(10, 3.5))
    ax = figure.subplots()
    layers = heads = 0
    for i, (name, array) in enumerate(values.items()):
        layers, heads = array.shape
        ax.plot(np.arange(array.size), array.reshape(-1), marker=".", label=name, color=_colour(name, i))
    for boundary in range(1, layers):
        ax.axvline(boundary * heads - 0.5, color="0.85", linewidth=0.8)
    ax.set_xlabel(f"attention head (layer-major, {heads} per layer)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    return figure


def per_layer(panels: Mapping[str, Mapping[str, Sequence[float]]], xlabel: str = "layer",
              first_layer: Mapping[str, int] | None = None, log_scale: bool = False) -> Figure:
    """Side-by-side panels (title → {model: values per layer}); ``first_layer`` gives a panel's x offset."""
    figure = Figure(figsize=(5.0 * len(panels), 3.5))
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, lines) in zip(axes, panels.items()):
        offset = (first_layer or {}).get(title, 0)
        for i, (name, ys) in enumerate(lines.items()):
            ax.plot(np.arange(len(ys)) + offset, ys, marker="o", label=name, color=_colour(name, i))
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if log_scale:
            ax.set_yscale("log")
        ax.legend()
    return figure


def minmax_curves(profiles: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str) -> Figure:
    """Per-token min and max of ``Y_l`` along the sequence, a pair of curves per model."""
    figure = Figure(figsize=(8, 3.5))
    ax = figure.subplots()
    for i, (name, (low, high)) in enumerate(profiles.items()):
        colour = _colour(name, i)
        positions = np.arange(len(low))
        ax.plot(positions, high, color=colour, label=f"{name} max")
        ax.plot(positions, low, color=colour, linestyle="--", label=f"{name} min")
    ax.set_xlabel("token position")
    ax.set_ylabel("attention output value")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    return figure


def eigenvalue_bars(values: Mapping[str, Sequence[float]], title: str = "Hessian top eigenvalues") -> Figure:
    figure = Figure(figsize=(6, 3.5))
    ax = figure.subplots()
    width = 0.8 / max(1, max((len(v) for v in values.values()), default=1))
    for rank in range(max((len(v) for v in values.values()), default=0)):
        xs = [i + rank * width for i, v in enumerate(values.values()) if rank < len(v)]
        ys = [v[rank] for v in values.values() if rank < len(v)]
        ax.bar(xs, ys, width=width, label=f"λ{rank + 1}")
    ax.set_xticks(range(len(values)), list(values))
    ax.set_ylabel("eigenvalue")
    ax.set_title(title)
    ax.legend()
    return figure


def training_curves(logs: Mapping[str, RunCurves], split: str, title: str, phases: Optional[Sequence[str]] = None) -> Figure:
    """One panel per column of ``split`` (loss terms for "train", metrics for "dev"), a line per run × phase."""
    columns = list(dict.fromkeys(c for log in logs.values() for c in log.columns_of(split)))
    if not columns:
        raise ValueError(f"no {split!r} rows with values in the run log(s)")
    ncols = min(3, len(columns))
    nrows = -(-len(columns) // ncols)
    figure = Figure(figsize=(5.0 * ncols, 3.2 * nrows))
    axes = figure.subplots(nrows, ncols, squeeze=False).reshape(-1)
    for ax, column in zip(axes, columns):
        index = 0
        for label, log in logs.items():
            for phase in log.phases():
                if phases is not None and phase not in phases:
                    continue
                data = log.series.get((phase, split, column))
                if not data:
                    continue
                steps, values = data
                name = label if len(log.phases()) == 1 else f"{label} [{phase}]"
                ax.plot(steps, values, label=name, color=f"C{index % 10}", marker="." if len(steps) < 30 else None)
                index += 1
        ax.set_title(column)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    for ax in axes[len(columns):]:
        ax.set_visible(False)
    figure.suptitle(title)
    return figure
