"""Examples of a described task (``task: "custom"``, :mod:`ds_kdqat.data.description`): the rows of a file
(:mod:`ds_kdqat.data.files`) or of a hub split, turned into :class:`~ds_kdqat.data.glue_format.Example` objects.

A row is bad when it could not be read (not UTF-8, malformed JSON, a wrong number of fields), when a text is
empty (or not text), when the label is missing, or when the label is wrong for the task: not a finite number
(regression), or not one of the task's classes (classification with known classes: the dev and test splits are
checked against the classes found in the training data). A bad row is a :class:`DataError` naming ``file:line``
(``on_bad_row="error"``) or is skipped and listed (``"skip"``). A column that no row has is always an error,
naming the columns the file does have.

Labels are kept as text: a class label as written (``"billing"``; a JSON/Parquet integer ``3`` as ``"3"``, a
boolean as ``"true"``/``"false"``, a hub ``ClassLabel`` index as its class name); a regression label as the
number's text.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional, Sequence

from ds_kdqat.data.files import format_of, has_column, lookup, read_table
from ds_kdqat.data.glue_format import BadRow, Example, ReadReport, collect_examples
from ds_kdqat.data.tasks import TaskSpec
from ds_kdqat.errors import DataError
from ds_kdqat.fileio import PathLike

logger = logging.getLogger(__name__)


def read_described_file(
    path: PathLike, spec: TaskSpec, fmt: Optional[str] = None, on_bad_row: str = "error"
) -> tuple[list[Example], ReadReport]:
    """The examples of one file of a described task, and what was seen (bad rows listed when skipped).

    Args:
        path: a CSV, TSV, JSON Lines or Parquet file.
        spec: the task (its text and label columns, its classes when known).
        fmt: the format; None = from the extension.
        on_bad_row: ``"error"`` or ``"skip"``.

    Raises:
        DataError: an empty or unreadable file, a missing column, no usable row, a bad row in error mode.
        FileNotFoundError: no such file.
    """
    path_str = str(path)
    fmt = format_of(path, fmt)
    if fmt is None:
        raise DataError(path_str, "unknown file format: name the file .csv, .tsv, .jsonl or .parquet, or set format")
    table = read_table(path, fmt)
    where = f"{path_str}:1" if fmt in ("csv", "tsv") else path_str
    check_columns(spec, table.columns, where, "the header has" if fmt in ("csv", "tsv") else "the file has")
    report = ReadReport(path=path_str, header=list(table.columns) if fmt in ("csv", "tsv") else None,
                        columns=list(table.columns))
    rows = ((record.line, None, record.reason) if record.reason is not None
            else (record.line, *row_example(spec, record.values, record.line, table.columns))
            for record in table.records)
    return collect_examples(rows, path_str, on_bad_row, report), report


def check_columns(spec: TaskSpec, columns: Sequence[str], where: str, has: str = "the file has") -> None:
    """DataError at ``where`` naming the task's columns that are not among ``columns``, and those that are."""
    missing = [name for name in (*spec.text_fields, spec.label_field) if not has_column(columns, name)]
    if missing:
        kinds = ["text" if name in spec.text_fields else "label" for name in missing]
        named = ", ".join(f"{kind} column {name!r}" for kind, name in zip(kinds, missing))
        raise DataError(where, f"no {named}; {has} the columns {list(columns)} (set text_columns / label_column)")


def row_example(
    spec: TaskSpec, values: dict[str, Any], line: int, columns: Sequence[str],
    class_names: Optional[Sequence[str]] = None,
) -> tuple[Optional[Example], Optional[str]]:
    """``(example, None)`` for a good row of ``spec``, ``(None, reason)`` for a bad one.

    ``class_names``: the hub's ``ClassLabel`` names of the label column, which turn an integer label into its
    name; None for files.
    """
    texts = []
    for name in spec.text_fields:
        found, value = lookup(values, name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if found and value is not None and not isinstance(value, str):
            return None, f"column {name!r} holds {type(value).__name__}, not text"
        text = (value or "").strip()
        if not text:
            return None, f"empty text in column {name!r}" if found else f"no value for text column {name!r}"
        texts.append(text)
    found, value = lookup(values, spec.label_field)
    label, reason = _label(spec, value, class_names)
    if reason is not None:
        return None, reason if found else f"no value for label column {spec.label_field!r}"
    row = ["" if values.get(c) is None else str(values.get(c)) for c in columns]
    return Example(texts[0], texts[1] if spec.is_pair else None, label, line, row, record=values), None


def _label(spec: TaskSpec, value: Any, class_names: Optional[Sequence[str]]) -> tuple[str, Optional[str]]:
    column = spec.label_field
    if value is None or (isinstance(value, str) and not value.strip()):
        return "", f"empty label in column {column!r}"
    if isinstance(value, (dict, list)):
        return "", f"label column {column!r} holds {type(value).__name__}, not a label"
    if spec.is_regression:
        if isinstance(value, bool):
            return "", f"label {value!r} in column {column!r} is not a number (regression task)"
        try:
            score = float(value)
        except (TypeError, ValueError):
            return "", f"label {value!r} in column {column!r} is not a number (regression task)"
        if not math.isfinite(score):
            return "", f"label {value!r} in column {column!r} is not a finite number"
        return (value.strip() if isinstance(value, str) else repr(score)), None
    if class_names is not None and isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < len(class_names):
            return "", f"label {value!r} is not a class index in [0, {len(class_names)}) (unlabelled split?)"
        value = class_names[value]
    label = class_label_text(value)
    if spec.labels and label not in spec.labels:
        return "", (f"label {label!r} in column {column!r} is not a class of the training data "
                    f"(classes: {list(spec.labels)})")
    return label, None


def class_label_text(value: Any) -> str:
    """A class label as text: strings stripped, integral numbers without ``.0``, booleans lower-case."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return value.strip() if isinstance(value, str) else str(value)


def load_described_hub_split(config: Any, spec: TaskSpec, split: str) -> list[Example]:
    """``datasets.load_dataset(hub_id[, hub_config], split=<the split's hub name>)`` as Examples.

    A ``ClassLabel`` label column gives its class names; a dotted column reaches into nested features. Bad rows
    follow ``config.on_bad_row``; a row's ``line`` is its 1-based row number.

    Raises:
        DataError: ``hub:<id>[<split>]`` for a missing column or no usable row, ``...:<row>`` for a bad row.
    """
    import datasets  # heavy; only needed here

    hub_split = spec.split_files[split]
    args = (config.hub_id,) if config.hub_config is None else (config.hub_id, config.hub_config)
    source = f"hub:{'/'.join(args)}[{hub_split}]"
    dataset = datasets.load_dataset(*args, split=hub_split)
    columns = list(dataset.column_names)
    check_columns(spec, columns, source, "the dataset has")
    feature = dataset.features.get(spec.label_field)
    class_names = list(feature.names) if getattr(feature, "names", None) is not None else None
    examples: list[Example] = []
    bad_rows: list[BadRow] = []
    for number, values in enumerate(dataset, start=1):
        example, reason = row_example(spec, values, number, columns, class_names)
        if reason is not None:
            if config.on_bad_row == "error":
                raise DataError(f"{source}:{number}", reason)
            bad_rows.append(BadRow(f"{source}:{number}", reason))
            continue
        examples.append(example)
    for bad in bad_rows:
        logger.warning("skipped bad row %s", bad)
    if bad_rows:
        logger.warning("skipped %d bad rows in all", len(bad_rows))
    if not examples:
        raise DataError(source, f"no usable rows ({len(bad_rows)} bad)")
    return examples
