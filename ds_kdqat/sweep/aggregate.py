"""The results table of a sweep, laid out like the papers' tables.

One row per (recipe, budget, swept hyper-parameters), one column per task plus ``Avg``. A cell is
``mean ± std`` of ``metric × scale`` over the seeds that finished, with the *sample* standard deviation
(n − 1 in the denominator); when fewer seeds than the sweep lists have finished, ``(n=k)`` is appended, and
a cell with one seed has no ± part. ``Avg`` is the mean of the row's task means; when some task has no
finished seed it averages the others and says ``(k/T tasks)``.

The optional first row, the full-precision teacher, takes for each (task, seed) the mean of the teacher
metric over the runs with that task and seed (they share one fine-tuned teacher), then mean ± std over seeds.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from ..analysis.io import write_csv
from ..errors import DataError
from ..fileio import atomic_write_text
from .config import SweepConfig
from .grid import GridPoint, budget_label, format_value, grid_points, point_dir
from .runner import RESULTS_FILE

TABLE_MARKDOWN = "results_table.md"
TABLE_CSV = "results_table.csv"
POINTS_CSV = "results_points.csv"
TEACHER_LABEL = "Full precision (teacher)"


@dataclass
class Cell:
    values: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / self.n if self.values else math.nan

    @property
    def std(self) -> float:
        """Sample standard deviation (NaN below two values)."""
        if self.n < 2:
            return math.nan
        mean = self.mean
        return math.sqrt(sum((v - mean) ** 2 for v in self.values) / (self.n - 1))


@dataclass
class Row:
    recipe: str
    budget: str
    hparams: tuple[tuple[str, object], ...]
    cells: dict[str, Cell]

    def average(self) -> tuple[float, int]:
        """(mean of the task means over tasks with data, number of such tasks)."""
        means = [c.mean for c in self.cells.values() if c.n]
        return (sum(means) / len(means) if means else math.nan), len(means)


@dataclass
class Table:
    tasks: list[str]
    hparam_keys: list[str]
    rows: list[Row]
    metric_label: str
    expected_seeds: int


def read_result(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}", f"not valid JSON: {error.msg}") from None
    if not isinstance(data, dict):
        raise DataError(str(path), "expected a JSON object")
    return data


def metric_value(result: dict, model: str, metric: Optional[str], source: str) -> tuple[str, float]:
    """(metric name, value) of ``model`` in a results.json; ``metric`` None = its ``primary_metric``."""
    name = metric or result.get("primary_metric")
    if not name:
        raise DataError(source, "has no primary_metric; set aggregate.metric in the sweep file")
    scores = result.get(model)
    if not isinstance(scores, dict) or name not in scores:
        found = sorted(scores) if isinstance(scores, dict) else "nothing"
        raise DataError(source, f"has no {model}.{name} (found {model}: {found})")
    value = scores[name]
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise DataError(source, f"{model}.{name} is {value!r}, expected a number")
    return name, float(value)


def collect_results(config: SweepConfig, points: Sequence[GridPoint]) -> dict[int, dict]:
    """Point index → parsed results.json, for the points that are done."""
    found = {}
    for point in points:
        path = point_dir(config, point) / RESULTS_FILE
        if path.is_file():
            found[point.index] = read_result(path)
    return found


def build_table(config: SweepConfig, points: Sequence[GridPoint], results: dict[int, dict]) -> Table:
    agg = config.aggregate
    tasks = list(config.axes.tasks)
    rows: dict[tuple, Row] = {}
    teacher_by_task_seed: dict[tuple[str, int], list[float]] = {}
    metric_names = set()
    for point in points:
        key = point.group
        row = rows.setdefault(key, Row(point.recipe, budget_label(point.budget), point.hparams,
                                       {task: Cell() for task in tasks}))
        if point.index not in results:
            continue
        source = str(point_dir(config, point) / RESULTS_FILE)
        name, value = metric_value(results[point.index], agg.model, agg.metric, source)
        metric_names.add(name)
        row.cells[point.task].values.append(value * agg.scale)
        if agg.include_teacher and agg.model == "student":
            _, teacher = metric_value(results[point.index], "teacher", name, source)
            teacher_by_task_seed.setdefault((point.task, point.seed), []).append(teacher * agg.scale)
    ordered = list(rows.values())
    if agg.include_teacher and agg.model == "student":
        teacher_row = Row(TEACHER_LABEL, "", (), {task: Cell() for task in tasks})
        for (task, _seed), values in sorted(teacher_by_task_seed.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            teacher_row.cells[task].values.append(sum(values) / len(values))
        ordered.insert(0, teacher_row)
    label = agg.metric or ("/".join(sorted(metric_names)) if metric_names else "primary metric")
    return Table(tasks, list(config.axes.overrides), ordered, label, len(config.axes.seeds))


def format_cell(cell: Cell, digits: int, expected_seeds: int) -> str:
    if cell.n == 0:
        return "–"
    text = f"{cell.mean:.{digits}f}"
    if cell.n >= 2:
        text += f" ± {cell.std:.{digits}f}"
    if cell.n < expected_seeds:
        text += f" (n={cell.n})"
    return text


def format_average(row: Row, digits: int) -> str:
    mean, count = row.average()
    if count == 0:
        return "–"
    text = f"{mean:.{digits}f}"
    if count < len(row.cells):
        text += f" ({count}/{len(row.cells)} tasks)"
    return text


def _hparam_value(row: Row, key: str) -> str:
    for k, v in row.hparams:
        if k == key:
            return format_value(v)
    return ""


def to_markdown(table: Table, digits: int) -> str:
    short = [k.rsplit(".", 1)[-1] for k in table.hparam_keys]
    header = ["Recipe", "Budget", *short, *table.tasks, "Avg"]
    lines = [
        f"Metric: {table.metric_label}; mean ± sample std over seeds (n = finished seeds when fewer than "
        f"{table.expected_seeds}).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * (2 + len(short)) + ["---:"] * (len(table.tasks) + 1)) + "|",
    ]
    for row in table.rows:
        expected = table.expected_seeds
        cells = [format_cell(row.cells[t], digits, expected) for t in table.tasks]
        values = [row.recipe, row.budget, *(_hparam_value(row, k) for k in table.hparam_keys), *cells,
                  format_average(row, digits)]
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def _round(value: float, digits: int) -> Optional[float]:
    return None if math.isnan(value) else round(value, digits + 2)


def to_csv(table: Table, path: Path, digits: int) -> Path:
    columns = ["recipe", "budget", *table.hparam_keys]
    for task in table.tasks:
        columns += [f"{task}_mean", f"{task}_std", f"{task}_n"]
    columns += ["avg_mean", "avg_tasks"]
    rows = []
    for row in table.rows:
        entry = {"recipe": row.recipe, "budget": row.budget}
        entry.update({k: _hparam_value(row, k) for k in table.hparam_keys})
        for task in table.tasks:
            cell = row.cells[task]
            entry.update({f"{task}_mean": _round(cell.mean, digits), f"{task}_std": _round(cell.std, digits),
                          f"{task}_n": cell.n})
        mean, count = row.average()
        entry.update(avg_mean=_round(mean, digits), avg_tasks=count)
        rows.append(entry)
    return write_csv(path, columns, rows)


def write_points_csv(config: SweepConfig, points: Sequence[GridPoint], results: dict[int, dict], path: Path) -> Path:
    """One line per grid point with its metric (empty when not done)."""
    keys = list(config.axes.overrides)
    columns = ["index", "name", "recipe", "task", "budget", "seed", *keys, "done", "metric", "student", "teacher",
               "wall_time_s"]
    rows = []
    for point in points:
        entry = {"index": point.index, "name": point.name, "recipe": point.recipe, "task": point.task,
                 "budget": budget_label(point.budget), "seed": point.seed, "done": point.index in results}
        entry.update({k: format_value(v) for k, v in point.hparams})
        result = results.get(point.index)
        if result is not None:
            source = str(point_dir(config, point) / RESULTS_FILE)
            name, student = metric_value(result, "student", config.aggregate.metric, source)
            entry.update(metric=name, student=student, wall_time_s=result.get("wall_time_s"))
            teacher = result.get("teacher", {})
            if isinstance(teacher, dict) and isinstance(teacher.get(name), (int, float)):
                entry["teacher"] = float(teacher[name])
        rows.append(entry)
    return write_csv(path, columns, rows)


def aggregate_sweep(config: SweepConfig) -> dict[str, Path]:
    """Write the Markdown table, its CSV and the per-point CSV under ``output_root``; return their paths."""
    points = grid_points(config)
    results = collect_results(config, points)
    table = build_table(config, points, results)
    root = Path(config.output_root)
    digits = config.aggregate.digits
    return {
        "markdown": atomic_write_text(root / TABLE_MARKDOWN, to_markdown(table, digits)),
        "csv": to_csv(table, root / TABLE_CSV, digits),
        "points": write_points_csv(config, points, results, root / POINTS_CSV),
    }
