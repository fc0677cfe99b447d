"""Run log: one CSV for every stage (``log.csv``) plus DeepSpeed's monitors (TensorBoard, CSV, W&B).

``log.csv`` columns: ``step, phase, split`` then one column per loss term or metric, in the order first
seen; a row leaves other rows' columns empty. The file is rewritten atomically at each write, so it is
always complete; on resume the rows after the resumed step are dropped, so a resumed run's log equals an
uninterrupted one's.
"""

from __future__ import annotations

import csv
import io
import os
from ..errors import DataError
from ..fileio import atomic_write_text

FIXED = ["step", "phase", "split"]


def _read(path: str) -> tuple[list[str], list[dict]]:
    """Columns and rows of an existing log; a file that is not a ds-kdqat log is a :class:`DataError`."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = list(reader.fieldnames or [])
            rows = [{k: v for k, v in row.items() if v not in ("", None)} for row in reader]
    except (UnicodeDecodeError, csv.Error) as error:
        raise DataError(path, f"not a ds-kdqat run log ({error}); it is left as it is") from None
    if columns[:len(FIXED)] != FIXED:
        raise DataError(path, f"not a ds-kdqat run log: its header starts {columns[:3]}, expected {FIXED}; "
                        "it is left as it is")
    for number, row in enumerate(rows, start=2):
        if not str(row.get("step", "")).isdigit() or None in row:
            raise DataError(f"{path}:{number}", "not a row of a ds-kdqat run log; the file is left as it is")
    return columns, rows


class RunLog:
    def __init__(self, path: str, enabled: bool, monitor=None):
        self.path, self.enabled, self.monitor = path, enabled, monitor
        self.rows: list[dict] = []
        self.columns: list[str] = list(FIXED)
        if enabled and os.path.exists(path):
            self.columns, self.rows = _read(path)

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
