"""How the labels of each split are spread: counts per class (classification) or a summary of the scores
(regression), reported when the data is loaded and kept in ``results.json`` (``label_counts``)."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ds_kdqat.data.tasks import TaskSpec

#: A split whose largest class is this many times its smallest is reported as imbalanced.
IMBALANCE_RATIO = 3.0


def label_counts(labels: torch.Tensor, spec: TaskSpec) -> dict[str, Any]:
    """Counts of each class (keys: the class names, in class-index order, zeros included) for
    classification; ``{"n", "mean", "std", "min", "max"}`` of the scores for regression.

    ``labels``: the encoded labels of a split (``EncodedDataset.labels``), class indices or scores.
    """
    if spec.is_regression:
        scores = labels.double()
        if scores.numel() == 0:
            return {"n": 0}
        return {"n": int(scores.numel()), "mean": float(scores.mean()),
                "std": float(scores.std(unbiased=False)), "min": float(scores.min()), "max": float(scores.max())}
    counts = torch.bincount(labels.long(), minlength=len(spec.labels)).tolist()
    return {name: int(count) for name, count in zip(spec.labels, counts)}


def describe_counts(split: str, counts: Mapping[str, Any], regression: bool) -> str:
    """One log line for a split's :func:`label_counts`, with a note when the classes are imbalanced."""
    if regression:
        if not counts.get("n"):
            return f"{split}: no scores"
        return (f"{split}: {counts['n']} scores, mean {counts['mean']:.4g}, std {counts['std']:.4g}, "
                f"range [{counts['min']:.4g}, {counts['max']:.4g}]")
    total = sum(counts.values())
    parts = ", ".join(f"{name}={count} ({count / max(total, 1):.1%})" for name, count in counts.items())
    line = f"{split}: {total} examples: {parts}"
    present = [count for count in counts.values() if count > 0]
    missing = [name for name, count in counts.items() if count == 0]
    if missing:
        line += f"; no example of {missing}"
    if present and max(present) >= IMBALANCE_RATIO * min(present):
        line += f"; imbalanced (largest class {max(present) / min(present):.1f}x the smallest)"
    return line
