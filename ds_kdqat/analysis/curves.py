"""Training curves from a run's ``log.csv``: each loss term on the train split, each metric on dev.

``log.csv`` (written by the trainer) has the columns ``step, phase, split`` and then one column per loss
term or metric; a row leaves the columns of other splits empty. A *series* is the non-empty values of one
column over the rows of one (phase, split), in file order. The schema (fixed columns, checks) is
:mod:`ds_kdqat.training.logger`'s, the writer's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..training.logger import FIXED_COLUMNS, read_log_table


@dataclass
class RunCurves:
    """One run's curves: ``series[(phase, split, column)] = (steps, values)``; ``columns`` (the term/metric
    columns) in file order."""

    source: str
    columns: list[str] = field(default_factory=list)
    series: dict[tuple[str, str, str], tuple[list[int], list[float]]] = field(default_factory=dict)

    def phases(self) -> list[str]:
        return list(dict.fromkeys(phase for phase, _, _ in self.series))

    def columns_of(self, split: str) -> list[str]:
        return [c for c in self.columns if any(s == split and col == c for _, s, col in self.series)]


def read_log(path: str | Path) -> RunCurves:
    """Parse ``log.csv`` into series; the file is checked by the schema's
    :func:`ds_kdqat.training.logger.read_log_table` (a bad header or value is a :class:`DataError` at file:line)."""
    columns, rows = read_log_table(path)
    curves = RunCurves(str(path), columns[len(FIXED_COLUMNS):])
    for row in rows:
        for column in curves.columns:
            if column in row:
                steps, values = curves.series.setdefault((row["phase"], row["split"], column), ([], []))
                steps.append(int(row["step"]))
                values.append(float(row[column]))
    return curves


def steps_to_reach(steps: list[int], values: list[float], fraction: float = 0.99, higher_is_better: bool = True) -> Optional[int]:
    """First step whose value reaches ``fraction`` of the best value (convergence speed); None if empty.

    For ``higher_is_better`` the target is ``fraction · max``; otherwise ``min / fraction`` (e.g. a loss).
    """
    finite = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
    if not finite:
        return None
    if higher_is_better:
        target = fraction * max(v for _, v in finite)
        return next(s for s, v in finite if v >= target)
    target = min(v for _, v in finite) / fraction
    return next(s for s, v in finite if v <= target)


def curve_summary(logs: dict[str, RunCurves], fraction: float = 0.99) -> list[dict]:
    """Per run, phase and dev metric: last and best value, and the first step reaching ``fraction`` of the
    best (metrics are taken as higher-is-better unless their name contains "loss")."""
    rows = []
    for label, log in logs.items():
        for (phase, split, column), (steps, values) in log.series.items():
            if split == "train" or not values:
                continue
            higher = "loss" not in column
            best = max(values) if higher else min(values)
            rows.append({
                "run": label, "phase": phase, "split": split, "metric": column, "last": values[-1], "best": best,
                "best_step": steps[values.index(best)], "steps_to_reach": steps_to_reach(steps, values, fraction, higher),
                "fraction": fraction,
            })
    return rows
