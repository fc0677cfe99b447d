"""Run log: one CSV for every stage (``log.csv``) plus DeepSpeed's monitors (TensorBoard, CSV, W&B).

``log.csv`` columns: ``step, phase, split`` then one column per loss term or metric, in the order first
seen; a row leaves other rows' columns empty. The file is rewritten atomically at each write, so it is
always complete; on resume the rows after the resumed step are dropped, so a resumed run's log equals an
uninterrupted one's.

This module owns the schema: :data:`FIXED_COLUMNS` and :func:`read_log_table` (used by the writer on resume
and by :mod:`ds_kdqat.analysis.curves` for plots).
"""

from __future__ import annotations

import csv
import io
import os
from ..errors import DataError
from ..fileio import atomic_write_text

FIXED_COLUMNS = ("step", "phase", "split")


def read_log_table(path: str | os.PathLike) -> tuple[list[str], list[dict[str, str]]]:
    """The ``log.csv`` schema, checked: the header and, per row, its non-empty cells as text.

    Header = ``step, phase, split`` first, then term/metric columns. A row must have at most as many cells as
    the header, ``step`` a non-negative integer, and every non-empty term/metric cell a number (``float``).
    Anything else is a :class:`DataError` at ``file:line`` (the header is line 1); an unreadable file or one
    that is not UTF-8 CSV is a :class:`DataError` naming the file.
    """
    path = str(path)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = list(reader.fieldnames or [])
            rows = list(reader)
    except OSError as error:
        raise DataError(path, f"cannot read the run log: {error.strerror}") from None
    except (UnicodeDecodeError, csv.Error) as error:
        raise DataError(path, f"not a UTF-8 CSV file ({error})") from None
    if tuple(columns[:len(FIXED_COLUMNS)]) != FIXED_COLUMNS:
        missing = [c for c in FIXED_COLUMNS if c not in columns]
        problem = f"missing column(s) {missing}" if missing else f"the header starts {columns[:len(FIXED_COLUMNS)]}"
        raise DataError(f"{path}:1", f"{problem}; expected {list(FIXED_COLUMNS)} first")
    terms = columns[len(FIXED_COLUMNS):]
    table = []
    for line, row in enumerate(rows, start=2):
        if None in row:
            raise DataError(f"{path}:{line}", f"more cells than the header's {len(columns)} columns")
        if not str(row.get("step") or "").isdigit():
            raise DataError(f"{path}:{line}", f"step is {row.get('step')!r}, expected an integer")
        for column in terms:
            text = row.get(column)
            if text:
                try:
                    float(text)
                except ValueError:
                    raise DataError(f"{path}:{line}", f"{column} is {text!r}, expected a number") from None
        table.append({k: v for k, v in row.items() if v not in ("", None)})
    return columns, table


class RunLog:
    """Writer of ``log.csv``: rows in memory, the whole file rewritten atomically at each write; an existing
    file is read back (and checked) with :func:`read_log_table` when ``enabled``."""

    def __init__(self, path: str, enabled: bool, monitor=None):
        self.path, self.enabled, self.monitor = path, enabled, monitor
        self.rows: list[dict] = []
        self.columns: list[str] = list(FIXED_COLUMNS)
        if enabled and os.path.exists(path):
            try:
                self.columns, self.rows = read_log_table(path)
            except DataError as error:
                raise DataError(path, f"not a ds-kdqat run log ({error}); it is left as it is") from None

    def truncate(self, phase_prefixes: tuple[str, ...], after_step: int) -> None:
        """Drop rows of the given phases logged after ``after_step`` (they will be logged again)."""
        if not self.enabled:
            return
        self.rows = [
            r for r in self.rows if not (r["phase"].startswith(phase_prefixes) and int(r["step"]) > after_step)
        ]
        self._flush()

    def write(self, step: int, phase: str, split: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "phase": phase, "split": split}
        for key, value in values.items():
            if key not in self.columns:
                self.columns.append(key)
            row[key] = f"{float(value):.6g}"
        self.rows.append(row)
        self._flush()
        if self.monitor is not None and getattr(self.monitor, "enabled", False):
            prefix = f"{phase.replace(':', '/')}/{split}"
            events = [(f"{prefix}/{k}", float(v), step) for k, v in values.items()]
            self.monitor.write_events(events)

    def _flush(self) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns, restval="")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buffer.getvalue())
