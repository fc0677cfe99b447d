"""Task metrics: accuracy, F1 (binary, macro, micro), Matthews correlation (scikit-learn), Pearson and Spearman correlation (scipy).

All functions take 1-D arrays of equal, non-zero length and return a Python float.

Degenerate inputs: where a formula divides by zero (constant predictions or constant labels for MCC and
the correlations; no positive prediction and no positive label for F1) the value is defined as 0.0
rather than NaN, so that a collapsed model scores "no better than chance" and checkpoint selection never
compares against NaN. The constant cases are caught here, before the library call (scikit-learn would
warn about a single class, scipy would warn and return NaN). scikit-learn and scipy are imported on first use, so importing :mod:`ds_kdqat.data` stays cheap.
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


def _constant(a: np.ndarray) -> bool:
    return bool(np.all(a == a[0]))


def _finite_floats(predictions: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    x, y = (a.astype(np.float64) for a in _pair(predictions, labels))
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("predictions and labels must be finite numbers")
    return x, y


def accuracy(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of positions where ``predictions == labels`` (``sklearn.metrics.accuracy_score``)."""
    from sklearn.metrics import accuracy_score

    p, y = _pair(predictions, labels)
    return float(accuracy_score(y, p))


def f1_score(predictions: ArrayLike, labels: ArrayLike, positive: int = 1) -> float:
    """F1 of class ``positive`` against all others: ``2·TP / (2·TP + FP + FN)``; 0.0 when ``TP + FP + FN = 0``
    (``sklearn.metrics.f1_score`` with ``labels=[positive]``, ``zero_division=0``)."""
    from sklearn.metrics import f1_score as sk_f1_score

    p, y = _pair(predictions, labels)
    return float(sk_f1_score(y, p, labels=[positive], average="macro", zero_division=0.0))


def averaged_f1(predictions: ArrayLike, labels: ArrayLike, num_classes: int, average: str) -> float:
    """F1 over all ``num_classes`` classes: ``"macro"`` = unweighted mean of the per-class F1 (a class that is
    neither predicted nor present scores 0.0, so a collapsed model is not rewarded); ``"micro"`` = F1 of the
    pooled counts, which for single-label classification equals accuracy (``sklearn.metrics.f1_score`` with
    ``labels=range(num_classes)``, ``zero_division=0``)."""
    from sklearn.metrics import f1_score as sk_f1_score

    if average not in ("macro", "micro"):
        raise ValueError(f"average must be 'macro' or 'micro', got {average!r}")
    p, y = _pair(predictions, labels)
    return float(sk_f1_score(y, p, labels=list(range(num_classes)), average=average, zero_division=0.0))


def matthews_corrcoef(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Matthews correlation coefficient, multi-class form (Gorodkin's R_K; ``sklearn.metrics.matthews_corrcoef``).

    With ``s`` samples, ``c`` correct, ``t_k`` true and ``p_k`` predicted counts of class k:
    ``MCC = (c·s − Σ p_k t_k) / sqrt((s² − Σ p_k²)(s² − Σ t_k²))``; for two classes this equals
    ``(TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))``. 0.0 when the denominator is zero
    (constant predictions or constant labels).
    """
    from sklearn.metrics import matthews_corrcoef as sk_mcc

    p, y = _pair(predictions, labels)
    if _constant(p) or _constant(y):  # scikit-learn's value too, but it warns when only one class occurs
        return 0.0
    return float(sk_mcc(y, p))


def pearson(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Pearson correlation ``Σ(x−x̄)(y−ȳ) / sqrt(Σ(x−x̄)² Σ(y−ȳ)²)`` (``scipy.stats.pearsonr``); 0.0 when
    either side is constant."""
    from scipy.stats import pearsonr

    x, y = _finite_floats(predictions, labels)
    if _constant(x) or _constant(y):
        return 0.0
    return float(pearsonr(x, y).statistic)


def average_ranks(values: ArrayLike) -> np.ndarray:
    """1-based ranks of ``values``; tied values all get the mean of the ranks they span
    (``scipy.stats.rankdata(method="average")``).

    ``[10, 20, 20, 30] -> [1, 2.5, 2.5, 4]``.
    """
    from scipy.stats import rankdata

    return rankdata(np.asarray(values).reshape(-1), method="average")


def spearman(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Spearman correlation: Pearson correlation of the average ranks (ties share their mean rank;
    ``scipy.stats.spearmanr``); 0.0 when either side is constant."""
    from scipy.stats import spearmanr

    x, y = _finite_floats(predictions, labels)
    if _constant(x) or _constant(y):
        return 0.0
    return float(spearmanr(x, y).statistic)


@register_metric("accuracy")
def _accuracy(p: np.ndarray, y: np.ndarray, spec: TaskSpec) -> float:
    return accuracy(p, y)


@register_metric("f1")
def _f1(p: np.ndarray, y: np.ndarray, spec: TaskSpec) -> float:
    if "1" not in spec.labels:
        raise ValueError(f"f1 needs a positive label '1'; task {spec.name!r} has labels {spec.labels}")
    return f1_score(p, y, positive=spec.labels.index("1"))


@register_metric("macro_f1")
def _macro_f1(p: np.ndarray, y: np.ndarray, spec: TaskSpec) -> float:
    return averaged_f1(p, y, spec.num_labels, "macro")


@register_metric("micro_f1")
def _micro_f1(p: np.ndarray, y: np.ndarray, spec: TaskSpec) -> float:
    return averaged_f1(p, y, spec.num_labels, "micro")


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
