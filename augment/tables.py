"""Augmenting a described task's train file (``--task custom``): CSV, TSV or JSON Lines in, the same format out.

The text and label columns are named as in training (``kdqat.data.text_columns`` / ``label_column``); every
other column of a row is copied to its new rows unchanged. Rows are read by
:func:`ds_kdqat.data.custom.read_described_file` (bad rows per ``on_bad_row``) and each chunk is written by
:func:`ds_kdqat.data.files.write_table` in the input's format, so the merged file is read back by the same
description. Parquet is not written chunk by chunk (its parts cannot be concatenated): convert it first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ds_kdqat.data.description import CUSTOM, DEFAULT_LABEL_COLUMN, DEFAULT_TEXT_COLUMNS
from ds_kdqat.data.files import format_of
from ds_kdqat.data.glue_format import Example
from ds_kdqat.data.tasks import TaskSpec
from ds_kdqat.errors import ConfigError

#: Formats the augmentation job writes (its chunk files are concatenated into the output).
AUGMENT_FORMATS: tuple[str, ...] = ("csv", "tsv", "jsonl")


def augment_spec(text_columns: Sequence[str] | None, label_column: str | None) -> TaskSpec:
    """The task of a described train file: its text and label columns, any labels (none are checked)."""
    return TaskSpec(
        name=CUSTOM, text_fields=tuple(text_columns or DEFAULT_TEXT_COLUMNS),
        label_field=label_column or DEFAULT_LABEL_COLUMN, labels=(), is_regression=False,
        metrics=("accuracy",), primary_metric="accuracy", split_files={"train": "", "dev": ""},
        labels_from_data=True,
    )


def table_format(path: Path, explicit: str | None, key: str = "augment.input") -> str:
    """The format of the input (and output) file; ConfigError at ``key`` when unknown or Parquet."""
    fmt = format_of(path, explicit)
    if fmt is None:
        raise ConfigError(key, f"cannot tell the format of {str(path)!r} from its extension; name it .csv, .tsv or "
                          f".jsonl, or set augment.format to one of {list(AUGMENT_FORMATS)}")
    if fmt not in AUGMENT_FORMATS:
        raise ConfigError(key, f"{fmt} files are not augmented (its chunks cannot be concatenated); convert "
                          f"{str(path)!r} to one of {list(AUGMENT_FORMATS)}")
    return fmt


def check_text_columns(spec: TaskSpec, columns: Sequence[str]) -> None:
    """A text column to rewrite must be a column of the file itself (not a path into a nested object)."""
    for i, name in enumerate(spec.text_fields):
        if name not in columns:
            raise ConfigError(f"augment.text_columns[{i}]", f"{name!r} is not a top-level column of the input "
                              f"(its columns: {list(columns)}); only such a column can be rewritten")


def augmented_records(example: Example, text_fields: Sequence[str], new_texts: Sequence[Sequence[str]]) -> list[dict]:
    """The original row, then for each text column its new texts, the other columns kept as they were."""
    record = example.record if example.record is not None else {}
    rows = [dict(record)]
    for name, texts in zip(text_fields, new_texts):
        for text in texts:
            row = dict(record)
            row[name] = text
            rows.append(row)
    return rows
