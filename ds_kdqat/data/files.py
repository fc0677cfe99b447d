"""Tables in files: CSV, TSV (with a header), JSON Lines and Parquet, read into records and written back.

This module knows the formats only; what the columns mean (texts, label) is :mod:`ds_kdqat.data.custom`'s job.

Formats (chosen by :func:`format_of` from the extension, or named explicitly):

* ``csv`` (``.csv``): a header line, then one record per row; RFC-4180 quoting (a quoted field may hold the
  delimiter, quotes and line breaks).
* ``tsv`` (``.tsv``): a header line, then one record per line, fields separated by tabs, no quoting (quotes are
  ordinary characters, as in the GLUE files).
* ``jsonl`` (``.jsonl``, ``.ndjson``): one JSON object per line; its keys are the columns (nested objects are
  reached with a dotted column path, ``labels.label``).
* ``parquet`` (``.parquet``, ``.pq``): read with pyarrow; struct columns are reached with a dotted path too.

Text files must be UTF-8 (a leading byte-order mark and ``\\r\\n`` line ends are accepted); blank lines are
ignored. A record's ``line`` is the 1-based physical line where it starts, the header being line 1 (for
Parquet, which has no lines, the 1-based row number). A record that cannot be read at all (not UTF-8,
malformed JSON, a wrong number of fields) is returned with its reason instead of values, so that the caller
decides between an error and skipping it.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from ds_kdqat.data.glue_format import allow_long_fields
from ds_kdqat.errors import DataError
from ds_kdqat.fileio import PathLike, atomic_write_text, atomic_write_via

FORMATS: tuple[str, ...] = ("csv", "tsv", "jsonl", "parquet")
EXTENSIONS: dict[str, str] = {
    ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet",
}
_SURROGATE = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8 (decoded with surrogateescape)
_TSV = dict(delimiter="\t", quoting=csv.QUOTE_NONE, quotechar=None)
_CSV = dict(delimiter=",", quotechar='"', doublequote=True)


def format_of(path: PathLike, explicit: Optional[str] = None) -> Optional[str]:
    """``explicit`` when given, else the format of ``path``'s extension (case-insensitive), else None."""
    if explicit is not None:
        return explicit
    return EXTENSIONS.get(Path(str(path)).suffix.lower())


@dataclass
class Record:
    """One row: where it starts and its values (column -> value), or why it could not be read."""

    line: int
    values: Optional[dict[str, Any]] = None
    reason: Optional[str] = None


@dataclass
class Table:
    """What :func:`read_table` read.

    Attributes:
        path: the file.
        format: one of :data:`FORMATS`.
        columns: the column names (CSV/TSV header, JSON keys in first-seen order, Parquet schema).
        records: every non-blank row, readable or not, in file order.
    """

    path: str
    format: str
    columns: list[str]
    records: list[Record] = field(default_factory=list)


def lookup(values: Mapping[str, Any], column: str) -> tuple[bool, Any]:
    """``(True, value)`` of ``column`` in ``values``: the key itself, else a dotted path into nested objects
    (``"labels.label"`` -> ``values["labels"]["label"]``); ``(False, None)`` when there is no such value."""
    if column in values:
        return True, values[column]
    node: Any = values
    for part in column.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def has_column(columns: Sequence[str], column: str) -> bool:
    """Whether ``column`` is one of ``columns`` or a dotted path starting at one of them."""
    return column in columns or column.split(".", 1)[0] in columns


def read_table(path: PathLike, fmt: str) -> Table:
    """Read ``path`` as a table in format ``fmt``.

    Raises:
        DataError: ``file`` for an empty file, a file without rows, an unreadable Parquet file; ``file:1`` for a
            bad header (not UTF-8, repeated names).
        FileNotFoundError: no such file.
        ValueError: unknown ``fmt``.
    """
    path_str = str(path)
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path_str}: no such file")
    if fmt == "parquet":
        table = _read_parquet(path_str)
    else:
        data = Path(path).read_bytes()
        if not data.strip():
            raise DataError(path_str, f"empty file (expected {fmt.upper()} rows)")
        table = _read_jsonl(path_str, data) if fmt == "jsonl" else _read_delimited(path_str, data, fmt)
    if not table.records:
        raise DataError(path_str, "no rows after the header" if fmt in ("csv", "tsv") else "no rows")
    return table


def _read_delimited(path: str, data: bytes, fmt: str) -> Table:
    allow_long_fields()
    text = data.decode("utf-8", errors="surrogateescape")
    if text.startswith("\ufeff"):
        text = text[1:]
    reader = csv.reader(io.StringIO(text, newline=""), **(_TSV if fmt == "tsv" else _CSV))
    header: Optional[list[str]] = None
    records: list[Record] = []
    previous = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            records.append(Record(reader.line_num, reason=f"unreadable {fmt.upper()} row: {exc}"))
            previous = reader.line_num
            continue
        start, previous = previous + 1, reader.line_num
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # a blank line
        if header is None:
            if _SURROGATE.search("".join(row)):
                raise DataError(f"{path}:{start}", "header is not valid UTF-8 text")
            header = [name.strip() for name in row]
            repeated = sorted({name for name in header if header.count(name) > 1})
            if repeated:
                raise DataError(f"{path}:{start}", f"column(s) {repeated} appear more than once in the header {header}")
            continue
        if _SURROGATE.search("".join(row)):
            records.append(Record(start, reason=_not_utf8(row)))
        elif len(row) != len(header):
            sep = "tab" if fmt == "tsv" else "comma"
            records.append(Record(start, reason=f"expected {len(header)} {sep}-separated fields (the header's), "
                                                f"found {len(row)}"))
        else:
            records.append(Record(start, values=dict(zip(header, row))))
    if header is None:
        raise DataError(path, f"empty file (expected a {fmt.upper()} header line)")
    return Table(path, fmt, header, records)


def _not_utf8(row: Sequence[str]) -> str:
    joined = "\t".join(row)
    position = _SURROGATE.search(joined).start()
    return f"not valid UTF-8 (byte 0x{ord(joined[position]) - 0xDC00:02x} at character {position} of the row)"


def _read_jsonl(path: str, data: bytes) -> Table:
    columns: dict[str, None] = {}
    records: list[Record] = []
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, start=1):
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            records.append(Record(number, reason=f"not valid UTF-8 ({exc.reason} at byte {exc.start})"))
            continue
        if number == 1 and line.startswith("\ufeff"):
            line = line[1:]
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            records.append(Record(number, reason=f"malformed JSON: {exc.msg} (column {exc.colno})"))
            continue
        if not isinstance(value, dict):
            records.append(Record(number, reason=f"expected a JSON object, found {type(value).__name__}"))
            continue
        columns.update(dict.fromkeys(value))
        records.append(Record(number, values=value))
    return Table(path, "jsonl", list(columns), records)


def _read_parquet(path: str) -> Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        if Path(path).stat().st_size == 0:
            raise DataError(path, "empty file (expected Parquet)") from None
        raise DataError(path, f"not a readable Parquet file: {exc}") from None
    rows = table.to_pylist()
    return Table(path, "parquet", list(table.column_names), [Record(i, values=row) for i, row in enumerate(rows, 1)])


def write_table(path: PathLike, fmt: str, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> int:
    """Write ``rows`` (column -> value) as a table in format ``fmt``, atomically; returns the number of rows.

    CSV/TSV get a header line of ``columns`` and each row's values in that order (values are written as text;
    TSV refuses a tab or line break inside a value); JSON Lines writes each row as one object as it is;
    Parquet lets pyarrow infer the schema.
    """
    rows = list(rows)
    if fmt == "jsonl":
        atomic_write_text(path, "".join(json.dumps(dict(row), ensure_ascii=False) + "\n" for row in rows))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist([dict(row) for row in rows])
        atomic_write_via(path, lambda tmp: pq.write_table(table, tmp))
    elif fmt in ("csv", "tsv"):
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n", **(_TSV if fmt == "tsv" else _CSV))
        writer.writerow(columns)
        for n, row in enumerate(rows, start=1):
            fields = ["" if row.get(name) is None else str(row.get(name)) for name in columns]
            if fmt == "tsv" and any(ch in value for value in fields for ch in "\t\n\r"):
                raise ValueError(f"{path}: row {n} holds a tab or line break, which a TSV file cannot carry")
            writer.writerow(fields)
        atomic_write_text(path, out.getvalue())
    else:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    return len(rows)
