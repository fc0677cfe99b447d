"""Task metrics in numpy: accuracy, F1, Matthews correlation, Pearson and Spearman correlation.

All functions take 1-D arrays of equal, non-zero length and return a Python float.

Degenerate inputs: where a formula divides by zero (constant predictions or constant labels for MCC and
the correlations; no positive prediction and no positive label for F1) the value is defined as 0.0
rather than NaN, so that a collapsed model scores "no better than chance" and checkpoint selection never
compares against NaN.
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import numpy as np

from ds_kdqat.data.tasks import TaskSpec

ArrayLike = Union[np.ndarray, Sequence[float], Sequence[int]]

MetricFn = Callable[[np.ndarray, np.ndarray, TaskSpec], float]
METRICS: dict[str, MetricFn] = {}


def register_metric(name: str) -> Callable[[MetricFn], MetricFn]:
    """Decorator filing ``fn(predictions, labels, spec) -> float`` under ``name`` in :data:`METRICS`."""

    def add(fn: MetricFn) -> MetricFn:
        METRICS[name] = fn
        return fn

    return add


def _pair(predictions: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(predictions), np.asarray(labels)
    if p.ndim != 1 or p.shape != y.shape:
        raise ValueError(f"predictions and labels must be 1-D of equal length, got {p.shape} and {y.shape}")
    if p.size == 0:
        raise ValueError("no predictions to score")
    return p, y


def accuracy(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of positions where ``predictions == labels``."""
    p, y = _pair(predictions, labels)
    return float(np.mean(p == y))


def f1_score(predictions: ArrayLike, labels: ArrayLike, positive: int = 1) -> float:
    """F1 of class ``positive``: ``2·TP / (2·TP + FP + FN)``; 0.0 when ``TP + FP + FN = 0``."""
    p, y = _pair(predictions, labels)
    tp = int(np.sum((p == positive) & (y == positive)))
    fp = int(np.sum((p == positive) & (y != positive)))
    fn = int(np.sum((p != positive) & (y == positive)))
    denominator = 2 * tp + fp + fn
    return 0.0 if denominator == 0 else 2 * tp / denominator


def matthews_corrcoef(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Matthews correlation coefficient, multi-class form (Gorodkin's R_K) on the confusion matrix ``C``.

    With ``s`` samples, ``c`` correct, ``t_k`` true and ``p_k`` predicted counts of class k:
    ``MCC = (c·s − Σ p_k t_k) / sqrt((s² − Σ p_k²)(s² − Σ t_k²))``; for two classes this equals
    ``(TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))``. 0.0 when the denominator is zero.
    """
    p, y = _pair(predictions, labels)
    classes, inverse = np.unique(np.concatenate([p, y]), return_inverse=True)
    p_idx, y_idx = inverse[: p.size], inverse[p.size :]
    k = classes.size
    confusion = np.zeros((k, k), dtype=np.float64)
    np.add.at(confusion, (y_idx, p_idx), 1.0)
    s = confusion.sum()
    c = np.trace(confusion)
    t = confusion.sum(axis=1)
    pk = confusion.sum(axis=0)
    denominator = np.sqrt((s * s - pk @ pk) * (s * s - t @ t))
    return 0.0 if denominator == 0 else float((c * s - pk @ t) / denominator)


def pearson(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Pearson correlation ``Σ(x−x̄)(y−ȳ) / sqrt(Σ(x−x̄)² Σ(y−ȳ)²)``; 0.0 when either side is constant."""
    x, y = (a.astype(np.float64) for a in _pair(predictions, labels))
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("predictions and labels must be finite numbers")
    dx, dy = x - x.mean(), y - y.mean()
    denominator = np.sqrt(np.sum(dx * dx) * np.sum(dy * dy))
    return 0.0 if denominator == 0 else float(np.clip(np.sum(dx * dy) / denominator, -1.0, 1.0))


def average_ranks(values: ArrayLike) -> np.ndarray:
    """1-based ranks of ``values``; tied values all get the mean of the ranks they span.

    ``[10, 20, 20, 30] -> [1, 2.5, 2.5, 4]``.
    """
    v = np.asarray(values)
    _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts + 1
    return (first_rank + (counts - 1) / 2.0)[inverse.reshape(-1)]


def spearman(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Spearman correlation: Pearson correlation of the average ranks (ties share their mean rank)."""
    p, y = _pair(predictions, labels)
    p, y = p.astype(np.float64), y.astype(np.float64)
    if not (np.all(np.isfinite(p)) and np.all(np.isfinite(y))):
        raise ValueError("predictions and labels must be finite numbers")
    return pearson(average_ranks(p), average_ranks(y))


@register_metric("accuracy")
def _accuracy(p: np.ndarray, y: np.ndarray, spec: TaskSpec) -> float:
    return accuracy(p, y)


@register_metric("f1")
def _f1(p: np.ndarray, y: np.ndarray, spec: TaskSpec) -> float:
    if "1" not in spec.labels:
        raise ValueError(f"f1 needs a positive label '1'; task {spec.name!r} has labels {spec.labels}")
    return f1_score(p, y, positive=spec.labels.index("1"))


@register_metric("mcc")
def _mcc(p: np.ndarray, y: np.ndarray, spec: TaskSpec) -> float:
    return matthews_corrcoef(p, y)


@register_metric("pearson")
def _pearson(p: np.ndarray, y: np.ndarray, spec: TaskSpec) -> float:
    return pearson(p, y)


@register_metric("spearman")
def _spearman(p: np.ndarray, y: np.ndarray, spec: TaskSpec) -> float:
    return spearman(p, y)


def compute_metrics(spec: TaskSpec, predictions: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """Every metric of ``spec`` (in ``spec.metrics`` order).

    Args:
        spec: the task.
        predictions: shape ``(n,)``; class indices (positions in ``spec.labels``) for classification,
            floats for regression.
        labels: shape ``(n,)``; the reference, same kind as ``predictions``.

    Returns ``{metric name: value}``; ``spec.primary_metric`` is among the keys.
    """
    p, y = _pair(predictions, labels)
    if not spec.is_regression:
        for name, a in (("predictions", p), ("labels", y)):
            if not np.issubdtype(a.dtype, np.integer):
                raise ValueError(f"{name} of classification task {spec.name!r} must be class indices, got {a.dtype}")
            if a.min() < 0 or a.max() >= spec.num_labels:
                raise ValueError(f"{name} hold class indices outside [0, {spec.num_labels}) for task {spec.name!r}")
    return {name: METRICS[name](p, y, spec) for name in spec.metrics}
