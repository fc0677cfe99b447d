"""The one reader and writer of the GLUE tsv layout, for every task in :mod:`ds_kdqat.data.tasks`.

Layout (as the GLUE files are distributed): UTF-8 text, one example per line, fields separated by tabs,
no quoting (the files hold stray ``"`` characters, so quotes are ordinary characters); a header line naming
the columns unless the task says otherwise (CoLA's train/dev files have none, their columns are
``spec.columns``). A leading UTF-8 byte-order mark and ``\\r\\n`` line ends are accepted.

Typical round trip (what the augmentation job does)::

    examples, report = read_task_file("glue/SST-2/train.tsv", get_task("sst2"))
    new = [dataclasses.replace(ex, text_a=augmented_text) for ex in examples]
    write_task_file("aug/train.tsv", get_task("sst2"), new, header=report.header)

The writer puts ``text_a``/``text_b``/``label`` of each :class:`Example` back into the columns they were
read from and keeps every other column of ``Example.row`` as it was, so the written file is read back by the
same spec. Line numbers in errors and reports are 1-based physical lines of the file, header included.
"""

from __future__ import annotations

import csv
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Optional, Sequence, Union

from ds_kdqat.fileio import PathLike, atomic_write_text
from ds_kdqat.data.tasks import TaskSpec
from ds_kdqat.errors import DataError

OnBadRow = Literal["error", "skip"]
ON_BAD_ROW_CHOICES: tuple[str, ...] = ("error", "skip")

_TSV = dict(delimiter="\t", quoting=csv.QUOTE_NONE, quotechar=None, strict=True)
# The csv module refuses a field over 131072 characters by default; a row is one physical line, so allow any
# length (text is truncated to max_seq_length tokens later). The C long behind the limit is 32-bit on Windows.
FIELD_SIZE_LIMIT = min(sys.maxsize, 2**31 - 1)


@dataclass
class Example:
    """One labelled example.

    Attributes:
        text_a: first text, surrounding whitespace stripped.
        text_b: second text of a sentence-pair task, else None.
        label: raw label string (``"1"``, ``"entailment"``, or the STS-B score as written).
        line: 1-based line of the file it was read from (for hub examples: 1-based row number in the split).
        row: all raw fields of that line, in file column order (for hub examples: the hub columns' values).
        record: for a described task (:mod:`ds_kdqat.data.custom`), the row as read (column -> value), so that
            it can be written back in its own format; else None.
    """

    text_a: str
    text_b: Optional[str]
    label: str
    line: int
    row: list[str] = field(default_factory=list)
    record: Optional[dict] = None


@dataclass(frozen=True)
class BadRow:
    """A row that was not usable: where (``file:line``) and why."""

    source: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


@dataclass
class ReadReport:
    """What :func:`read_task_file` saw.

    Attributes:
        path: the file read.
        header: the header line's column names, or None for a header-less layout; pass it to
            :func:`write_task_file` to write a file of the same layout.
        columns: the column names used (the header, or ``spec.columns``).
        rows: number of data lines (header excluded).
        examples: number of examples returned.
        bad_rows: every skipped row with its ``file:line`` and reason (only with ``on_bad_row="skip"``).
    """

    path: str
    header: Optional[list[str]]
    columns: list[str]
    rows: int = 0
    examples: int = 0
    bad_rows: list[BadRow] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return len(self.bad_rows)

    def summary(self) -> str:
        text = f"{self.path}: {self.examples} examples from {self.rows} rows"
        if self.bad_rows:
            text += f", {self.skipped} bad rows skipped"
        return text


def _split_lines(data: bytes) -> list[bytes]:
    """Physical lines without their ``\\n`` / ``\\r\\n`` end; a final line end adds no empty line."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [ln[:-1] if ln.endswith(b"\r") else ln for ln in lines]


def allow_long_fields(limit: int | None = None) -> None:
    """Raise the csv module's (process-wide) field size limit to ``limit`` (:data:`FIELD_SIZE_LIMIT`)."""
    csv.field_size_limit(FIELD_SIZE_LIMIT if limit is None else limit)


def _parse_fields(line: str) -> list[str]:
    return next(csv.reader((line,), **_TSV))


def _csv_error_reason(line: str, error: csv.Error) -> str:
    """What a csv.Error on ``line`` really means (a line holds no ``\\n``: ours are split on it)."""
    if "\r" in line:
        return "stray carriage return inside the line"
    return f"unreadable tsv line ({len(line)} characters): {error}"


def _decode(raw: bytes, lineno: int) -> str:
    text = raw.decode("utf-8")
    if lineno == 1 and text.startswith("\ufeff"):
        text = text[1:]
    return text


def _resolve_columns(spec: TaskSpec, columns: Sequence[str], source: str) -> dict[str, int]:
    """Column index of each text field and the label field; DataError naming ``source`` if any is missing."""
    wanted = (*spec.text_fields, spec.label_field)
    missing = [name for name in wanted if name not in columns]
    if missing:
        raise DataError(
            source,
            f"header lacks column(s) {missing} of task {spec.name!r} "
            f"(expected {list(wanted)} among the columns; found {list(columns)})",
        )
    repeated = [name for name in wanted if list(columns).count(name) > 1]
    if repeated:
        raise DataError(source, f"column(s) {repeated} appear more than once in the header {list(columns)}")
    return {name: list(columns).index(name) for name in wanted}


def _check_label(spec: TaskSpec, label: str) -> Optional[str]:
    """Why ``label`` is not valid for ``spec``, or None."""
    if spec.is_regression:
        try:
            value = float(label)
        except ValueError:
            return f"{spec.label_field} {label!r} is not a number"
        if not math.isfinite(value):
            return f"{spec.label_field} {label!r} is not a finite number"
        return None
    if label not in spec.labels:
        return f"unknown label {label!r} in column {spec.label_field!r} (allowed: {list(spec.labels)})"
    return None


def read_task_file(
    path: PathLike, spec: TaskSpec, on_bad_row: OnBadRow = "error"
) -> tuple[list[Example], ReadReport]:
    """Read one GLUE-format tsv file of task ``spec``.

    Args:
        path: the tsv file.
        spec: the task whose layout and labels the file must follow.
        on_bad_row: ``"error"`` raises :class:`DataError` at the first bad row; ``"skip"`` leaves bad rows
            out and lists each (``file:line`` and why) in ``report.bad_rows``.

    A row is bad when it is blank, cannot be decoded as UTF-8, has a stray carriage return (or another
    error of the csv module, reported with its message), has a number of fields other than the number of
    columns, has an empty text field, an unknown label, or (regression) a label that is not a finite number.
    A line may be of any length (the csv module's field size limit is raised to :data:`FIELD_SIZE_LIMIT`).

    Raises:
        DataError: ``file`` for an empty file, a file with no data rows, or no usable rows at all;
            ``file:1`` for a header without the task's columns; ``file:line`` for a bad row in error mode.
        FileNotFoundError: no such file.
    """
    if on_bad_row not in ON_BAD_ROW_CHOICES:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW_CHOICES}, got {on_bad_row!r}")
    path_str = str(path)
    allow_long_fields()
    data = Path(path).read_bytes()
    lines = _split_lines(data)
    if not lines:
        raise DataError(path_str, f"empty file (expected the GLUE tsv layout of task {spec.name!r})")

    first_data = 0
    header: Optional[list[str]] = None
    if spec.has_header:
        try:
            first_line = _decode(lines[0], 1)
        except UnicodeDecodeError as exc:
            raise DataError(f"{path_str}:1", f"unreadable header: {exc}") from None
        try:
            header = _parse_fields(first_line)
        except csv.Error as exc:
            raise DataError(f"{path_str}:1", f"unreadable header: {_csv_error_reason(first_line, exc)}") from None
        columns = header
        first_data = 1
    else:
        columns = list(spec.columns)
    index = _resolve_columns(spec, columns, f"{path_str}:1")
    text_idx = [index[name] for name in spec.text_fields]
    label_idx = index[spec.label_field]

    report = ReadReport(path=path_str, header=header, columns=list(columns))
    if len(lines) == first_data:
        raise DataError(path_str, "no rows after the header" if header is not None else "no rows")

    rows = ((first_data + offset + 1,
             *_parse_row(raw, first_data + offset + 1, spec, len(columns), text_idx, label_idx))
            for offset, raw in enumerate(lines[first_data:]))
    return collect_examples(rows, path_str, on_bad_row, report), report


def collect_examples(rows: Iterable[tuple[int, Optional[Example], Optional[str]]], path_str: str,
                     on_bad_row: str, report: ReadReport) -> list[Example]:
    """The examples of ``rows`` — ``(line, example, reason)``, ``reason`` None for a good row — with the
    bad-row policy applied: ``"error"`` raises :class:`DataError` at ``path_str:line``, ``"skip"`` records the row
    in ``report.bad_rows``. Counts go into ``report``; a file without a usable row is a DataError."""
    examples: list[Example] = []
    for line, example, reason in rows:
        report.rows += 1
        if reason is not None:
            if on_bad_row == "error":
                raise DataError(f"{path_str}:{line}", reason)
            report.bad_rows.append(BadRow(f"{path_str}:{line}", reason))
            continue
        examples.append(example)
    report.examples = len(examples)
    if not examples:
        first = report.bad_rows[0] if report.bad_rows else None
        raise DataError(path_str, f"no usable rows: all {report.rows} rows are bad (first: {first})")
    return examples


def _parse_row(
    raw: bytes, lineno: int, spec: TaskSpec, n_columns: int, text_idx: list[int], label_idx: int
) -> tuple[Optional[Example], Optional[str]]:
    """(example, None) for a good row, (None, reason) for a bad one."""
    try:
        line = _decode(raw, lineno)
    except UnicodeDecodeError as exc:
        return None, f"not valid UTF-8 ({exc.reason} at byte {exc.start})"
    if not line.strip():
        return None, "blank line"
    try:
        fields = _parse_fields(line)
    except csv.Error as exc:
        return None, _csv_error_reason(line, exc)
    if len(fields) != n_columns:
        return None, f"expected {n_columns} tab-separated columns, found {len(fields)}"
    texts = [fields[i].strip() for i in text_idx]
    for name, text in zip(spec.text_fields, texts):
        if not text:
            return None, f"empty text in column {name!r}"
    label = fields[label_idx].strip()
    why = _check_label(spec, label)
    if why is not None:
        return None, why
    text_b = texts[1] if len(texts) == 2 else None
    return Example(text_a=texts[0], text_b=text_b, label=label, line=lineno, row=fields), None


def write_task_file(
    path: PathLike,
    spec: TaskSpec,
    examples_or_rows: Iterable[Union[Example, Sequence[str]]],
    header: Optional[Sequence[str]] = None,
) -> int:
    """Write examples (or raw rows) as a GLUE-format tsv file of task ``spec``, atomically.

    Args:
        path: destination; written to a temporary file beside it, then renamed over it.
        spec: the task; decides whether a header is written.
        examples_or_rows: :class:`Example` objects, whose ``row`` is written with the text and label
            columns replaced by ``text_a``/``text_b``/``label``; or plain sequences of field strings,
            written as they are. Both must have one field per column.
        header: the column names (``report.header`` of :func:`read_task_file`); required when the task's
            files have a header, must be None when they do not (the columns are then ``spec.columns``).

    Returns the number of data rows written.

    Raises:
        ValueError: wrong ``header`` for the layout, a field holding a tab or line break (the layout has no
            quoting), a row of the wrong length, an invalid label, or nothing to write.
    """
    if spec.has_header:
        if header is None:
            raise ValueError(f"task {spec.name!r} files have a header: pass header= (e.g. report.header)")
        columns = list(header)
    else:
        if header is not None:
            raise ValueError(f"task {spec.name!r} files have no header: pass header=None")
        columns = list(spec.columns)
    index = _resolve_columns(spec, columns, str(path))

    out_lines: list[str] = []
    if header is not None:
        out_lines.append(_format_row(columns, "header"))
    for n, item in enumerate(examples_or_rows, start=1):
        where = f"row {n}" + (f" (read from line {item.line})" if isinstance(item, Example) else "")
        if isinstance(item, Example):
            row = _example_row(item, spec, index, len(columns), where)
        else:
            row = [str(value) for value in item]
        if len(row) != len(columns):
            raise ValueError(f"{path}: {where} has {len(row)} fields, the layout has {len(columns)} columns")
        out_lines.append(_format_row(row, where))
    n_rows = len(out_lines) - (1 if header is not None else 0)
    if n_rows == 0:
        raise ValueError(f"{path}: nothing to write (a task file needs at least one row)")
    atomic_write_text(path, "".join(out_lines))
    return n_rows


def _example_row(example: Example, spec: TaskSpec, index: dict[str, int], n_columns: int, where: str) -> list[str]:
    if len(example.row) != n_columns:
        raise ValueError(
            f"{where}: Example.row has {len(example.row)} fields, the layout has {n_columns} columns"
        )
    if (example.text_b is None) == spec.is_pair:
        raise ValueError(f"{where}: task {spec.name!r} {'needs' if spec.is_pair else 'has no'} text_b")
    why = _check_label(spec, example.label)
    if why is not None:
        raise ValueError(f"{where}: {why}")
    row = list(example.row)
    texts = (example.text_a, example.text_b) if spec.is_pair else (example.text_a,)
    for name, value in (*zip(spec.text_fields, texts), (spec.label_field, example.label)):
        if not value or not value.strip():
            raise ValueError(f"{where}: empty value for column {name!r}")
        # An unchanged value keeps its raw spelling (GLUE's SST-2 sentences end in a space), so a file read
        # and written back without changes is the same bytes.
        if value != row[index[name]].strip():
            row[index[name]] = value
    return row


def _format_row(fields: Sequence[str], where: str) -> str:
    for value in fields:
        if any(ch in value for ch in "\t\n\r"):
            raise ValueError(f"{where}: field {value!r} holds a tab or line break, which the tsv layout cannot carry")
    return "\t".join(fields) + "\n"
