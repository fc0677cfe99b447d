"""Load one split of a task as :class:`~ds_kdqat.data.glue_format.Example` objects, from files or the hub."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from ds_kdqat.data.config import DataConfig
from ds_kdqat.data.custom import load_described_hub_split, read_described_file
from ds_kdqat.data.description import discover_labels, is_described, task_spec
from ds_kdqat.data.embedded import materialize_rt_polarity, project_data_cache
from ds_kdqat.fileio import PathLike
from ds_kdqat.data.glue_format import BadRow, Example, read_task_file
from ds_kdqat.data.tasks import TaskSpec, get_task
from ds_kdqat.errors import DataError

logger = logging.getLogger(__name__)


def task_dir(config: DataConfig, cache_dir: Optional[PathLike] = None) -> Path:
    """The local folder holding the task's tsv files (source ``"local"``). Nothing is ever written into a
    ``data_dir`` the user names: it is read as it is.

    For the embedded task without a ``data_dir``, the split is materialised first (a no-op when already
    done) in ``<cache_dir>/rt_polarity-seed<S>-dev<F>``, so that runs with other split settings do not
    overwrite each other. ``cache_dir`` defaults to ``<repo>/.cache/data``. With a ``data_dir``, the
    embedded task reads the user's own ``train.tsv``/``dev.tsv`` (SST-2 layout) from it.
    """
    spec = get_task(config.task)
    if config.data_dir is not None:
        return Path(config.data_dir)
    if spec.embedded:
        cache = Path(cache_dir) if cache_dir is not None else project_data_cache()
        out = cache / f"{spec.name}-seed{config.split_seed}-dev{config.dev_fraction:g}"
        return materialize_rt_polarity(out, dev_fraction=config.dev_fraction, seed=config.split_seed)
    raise DataError(spec.name, "no data_dir given for a local GLUE-format task")


def load_split(
    config: DataConfig, split: str, cache_dir: Optional[PathLike] = None, spec: Optional[TaskSpec] = None
) -> list[Example]:
    """Examples of ``split`` (``"train"`` or one of ``spec.eval_splits``) for ``config``.

    ``config.train_file`` replaces the train split; ``config.max_train_examples`` /
    ``config.max_eval_examples`` keep the first N. Skipped bad rows (``on_bad_row="skip"``) are logged one
    by one with their file:line.

    ``spec``: the task, by default :func:`~ds_kdqat.data.description.task_spec` of ``config``. For a described
    classification task whose classes come from the data, pass the spec returned by :func:`with_training_labels`
    when loading an evaluation split, so that its labels are checked against the training classes.

    Raises:
        ValueError: unknown split name for the task.
        DataError: bad data (see :func:`ds_kdqat.data.glue_format.read_task_file`) or missing embedded data.
        FileNotFoundError: a local file that is not there.
    """
    spec = spec if spec is not None else task_spec(config)
    if split not in spec.split_files:
        raise ValueError(f"task {spec.name!r} has no split {split!r}; its splits are {list(spec.splits)}")

    if is_described(config):
        examples = _load_described(config, spec, split)
    elif split == "train" and config.train_file is not None:
        examples = _read_local(Path(config.train_file), spec, config)
    elif config.source == "hub":
        examples = load_hub_split(spec, split, config.on_bad_row)
    else:
        examples = _read_local(task_dir(config, cache_dir) / spec.split_files[split], spec, config)

    limit = config.max_train_examples if split == "train" else config.max_eval_examples
    return examples[:limit] if limit is not None else examples


def _load_described(config: DataConfig, spec: TaskSpec, split: str) -> list[Example]:
    """A split of a described task: its file, or (source ``hub``) its hub split unless train_file replaces it."""
    if config.source == "hub" and not (split == "train" and config.train_file is not None):
        return load_described_hub_split(config, spec, split)
    path = Path(config.train_file if split == "train" else spec.split_files[split])
    examples, report = read_described_file(path, spec, config.format, config.on_bad_row)
    _log_bad_rows(report.bad_rows)
    logger.info("%s", report.summary())
    return examples


def with_training_labels(spec: TaskSpec, train: Sequence[Example], source: str = "train") -> TaskSpec:
    """``spec`` with its classes, for a classification task that takes them from the data
    (:func:`~ds_kdqat.data.description.discover_labels` of the training labels); ``spec`` itself otherwise.

    Raises:
        DataError: at ``source``, when the training data holds fewer than two classes.
    """
    if not spec.labels_from_data or spec.is_image:
        return spec
    labels = discover_labels(example.label for example in train)
    if len(labels) < 2:
        raise DataError(source, f"the training data has {len(labels)} class(es) {list(labels)}; a classifier needs "
                                "at least two")
    return spec.with_labels(labels)


def _read_local(path: Path, spec: TaskSpec, config: DataConfig) -> list[Example]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (task {spec.name!r} expects {', '.join(spec.split_files.values())})")
    examples, report = read_task_file(path, spec, on_bad_row=config.on_bad_row)
    _log_bad_rows(report.bad_rows)
    logger.info("%s", report.summary())
    return examples


def _log_bad_rows(bad_rows: list[BadRow]) -> None:
    for bad in bad_rows:
        logger.warning("skipped bad row %s", bad)
    if bad_rows:
        logger.warning("skipped %d bad rows in all", len(bad_rows))


def load_hub_split(spec: TaskSpec, split: str, on_bad_row: str = "error") -> list[Example]:
    """``datasets.load_dataset(*spec.hub_id, split=spec.hub_splits[split])`` converted to Examples.

    Hub class indices are mapped to raw labels through the dataset's ``ClassLabel`` names and
    ``spec.hub_label_map`` (the names are checked against the map). A row with label -1 (unlabelled), an
    unknown class, a non-numeric score or an empty text is bad: an error, or skipped and logged. Each
    Example's ``line`` is its 1-based row number and ``row`` the string values of all hub columns.

    Raises:
        DataError: ``hub:<id>[<split>]`` or ``hub:<id>[<split>]:<row>`` naming what is wrong.
    """
    import datasets  # heavy; only needed here

    if spec.hub_id is None:
        raise DataError(spec.name, "task is not on the hub")
    hub_split = spec.hub_splits[split]
    source = f"hub:{'/'.join(spec.hub_id)}[{hub_split}]"
    dataset = datasets.load_dataset(*spec.hub_id, split=hub_split)

    wanted = (*spec.hub_text_fields, spec.hub_label_field)
    missing = [c for c in wanted if c not in dataset.column_names]
    if missing:
        raise DataError(source, f"missing column(s) {missing}; found {dataset.column_names}")
    class_names = _hub_class_names(spec, dataset.features.get(spec.hub_label_field), source)

    examples: list[Example] = []
    bad_rows: list[BadRow] = []
    for i, record in enumerate(dataset):
        example, reason = _hub_example(spec, record, i + 1, class_names, dataset.column_names)
        if reason is not None:
            if on_bad_row == "error":
                raise DataError(f"{source}:{i + 1}", reason)
            bad_rows.append(BadRow(f"{source}:{i + 1}", reason))
            continue
        examples.append(example)
    _log_bad_rows(bad_rows)
    if not examples:
        raise DataError(source, f"no usable rows ({len(bad_rows)} bad)")
    return examples


def _hub_class_names(spec: TaskSpec, feature: Any, source: str) -> list[str]:
    if spec.is_regression:
        return []
    expected = list(spec.hub_label_map)
    names = getattr(feature, "names", None)
    if names is None:
        return expected
    if sorted(names) != sorted(expected):
        raise DataError(source, f"label classes {names} differ from the expected {expected}")
    return list(names)


def _hub_example(
    spec: TaskSpec, record: dict, number: int, class_names: list[str], columns: list[str]
) -> tuple[Optional[Example], Optional[str]]:
    texts = []
    for name in spec.hub_text_fields:
        value = record[name]
        text = value.strip() if isinstance(value, str) else ""
        if not text:
            return None, f"empty text in column {name!r}"
        texts.append(text)
    value = record[spec.hub_label_field]
    if spec.is_regression:
        try:
            score = float(value)
        except (TypeError, ValueError):
            return None, f"score {value!r} is not a number"
        if not math.isfinite(score):
            return None, f"score {value!r} is not a finite number"
        label = repr(score)
    else:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(class_names):
            return None, f"label {value!r} is not a class index in [0, {len(class_names)}) (unlabelled split?)"
        label = spec.hub_label_map[class_names[value]]
    row = ["" if record[c] is None else str(record[c]) for c in columns]
    return Example(texts[0], texts[1] if spec.is_pair else None, label, number, row), None
