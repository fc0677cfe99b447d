"""Training curves from a run's ``log.csv``: each loss term on the train split, each metric on dev.

``log.csv`` (written by the trainer) has the columns ``step, phase, split`` and then one column per loss
term or metric; a row leaves the columns of other splits empty. A *series* is the non-empty values of one
column over the rows of one (phase, split), in file order.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import DataError

FIXED_COLUMNS = ("step", "phase", "split")


@dataclass
class RunLog:
    """``series[(phase, split, column)] = (steps, values)``; ``columns`` in file order."""

    source: str
    columns: list[str] = field(default_factory=list)
    series: dict[tuple[str, str, str], tuple[list[int], list[float]]] = field(default_factory=dict)

    def phases(self) -> list[str]:
        return list(dict.fromkeys(phase for phase, _, _ in self.series))

    def columns_of(self, split: str) -> list[str]:
        return [c for c in self.columns if any(s == split and col == c for _, s, col in self.series)]


def read_log(path: str | Path) -> RunLog:
    """Parse ``log.csv``; a missing fixed column or a non-numeric value is a :class:`DataError` at file:line."""
    path = Path(path)
    try:
        handle = open(path, newline="", encoding="utf-8")
    except OSError as error:
        raise DataError(str(path), f"cannot read the run log: {error.strerror}") from None
    with handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        missing = [c for c in FIXED_COLUMNS if c not in header]
        if missing:
            raise DataError(f"{path}:1", f"missing column(s) {missing}; expected {list(FIXED_COLUMNS)} first")
        log = RunLog(str(path), [c for c in header if c not in FIXED_COLUMNS])
        for line, row in enumerate(reader, start=2):
            try:
                step = int(float(row["step"]))
            except (TypeError, ValueError):
                raise DataError(f"{path}:{line}", f"step is {row['step']!r}, expected an integer") from None
            for column in log.columns:
                text = row.get(column)
                if text is None or text == "":
                    continue
                try:
                    value = float(text)
                except ValueError:
                    raise DataError(f"{path}:{line}", f"{column} is {text!r}, expected a number") from None
                steps, values = log.series.setdefault((row["phase"], row["split"], column), ([], []))
                steps.append(step)
                values.append(value)
    return log


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


def curve_summary(logs: dict[str, RunLog], fraction: float = 0.99) -> list[dict]:
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
