"""Report file formats: JSON with NaN/inf as null, CSV from dict rows, PNG from a matplotlib figure.

Only the formatting lives here; every file is written by :mod:`ds_kdqat.fileio` (same-directory temporary
file, fsync, ``os.replace``), so a reader or a resumed sweep sees the old file or the complete new one.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..fileio import atomic_write_bytes, atomic_write_text


def _json_safe(value: Any) -> Any:
    """NaN/inf are not JSON: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """``data`` as indented JSON in insertion order (not sorted), NaN/inf as null, final newline."""
    return atomic_write_text(path, json.dumps(_json_safe(data), indent=2, sort_keys=False) + "\n")


def write_csv(path: str | os.PathLike, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> Path:
    """Rows are dicts keyed by column; missing keys are left empty, floats written with ``repr`` precision."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="raise", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v) for k, v in row.items()})
    return atomic_write_text(path, buffer.getvalue())


def save_figure(figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Render a matplotlib ``Figure`` (made without pyplot, see :mod:`ds_kdqat.analysis.plots`) to PNG atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return atomic_write_bytes(path, buffer.getvalue())
