"""A task from a description (``kdqat.data.task: "custom"``) instead of a registered name.

The description says where the splits are (files, or a hub dataset), which columns hold the text(s) and the
label, whether the label is a class or a score, and how the task is scored::

    "data": {"task": "custom", "train_file": "data/train.csv", "dev_file": "data/dev.csv",
             "text_columns": ["text"], "label_column": "label", "task_type": "classification"}

It becomes a :class:`~ds_kdqat.data.tasks.TaskSpec` like the registered presets (GLUE, ``rt_polarity``), whose
files and labels are fixed: :func:`task_spec` returns one or the other. A classification description without
``labels`` takes its classes from the training data (``labels_from_data``; see :func:`discover_labels`).

Keys (all of :class:`~ds_kdqat.data.config.DataConfig`; only ``task: "custom"`` reads them):

* ``source: "local"``: ``train_file``, ``dev_file`` (required), ``test_file`` (optional), each in CSV, TSV,
  JSON Lines or Parquet, chosen by extension or by ``format``.
* ``source: "hub"``: ``hub_id`` (+ ``hub_config``), split names ``hub_train_split`` (``"train"``),
  ``hub_dev_split`` (``"validation"``), ``hub_test_split`` (none); ``train_file`` may replace the train split
  (an augmented copy, in one of the file formats).
* ``text_columns``: one or two columns (default ``["text"]``); ``label_column`` (default ``"label"``). A dotted
  name (``labels.label``) reaches into a nested object (JSON Lines, Parquet structs, hub features).
* ``task_type``: ``"classification"`` (default) or ``"regression"`` (a float label).
* ``labels``: the class names in class-index order (optional; classification only). Without it the classes are
  the distinct training labels, sorted (numerically when every label is an integer): the class index of a label
  never depends on the row order, so a shuffled or augmented train file gives the same model head.
* ``metrics``: names from :data:`CLASSIFICATION_METRICS` / :data:`REGRESSION_METRICS`; default
  ``["macro_f1", "accuracy"]`` / ``["pearson", "spearman"]``. ``primary_metric`` (default: the first metric)
  picks the best checkpoint.

``primary_metric`` is also read for a registered task, where it replaces the task's default (one of the task's
fixed metrics, e.g. ``spearman`` for ``stsb``, as the GLUE papers report it); the other keys above are not.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Iterable

from ds_kdqat.data.files import FORMATS, format_of
from ds_kdqat.data.tasks import TaskSpec, get_task
from ds_kdqat.errors import ConfigError

if TYPE_CHECKING:
    from ds_kdqat.data.config import DataConfig

CUSTOM = "custom"
TASK_TYPES: tuple[str, ...] = ("classification", "regression")
CLASSIFICATION_METRICS: tuple[str, ...] = ("accuracy", "macro_f1", "micro_f1", "mcc")
REGRESSION_METRICS: tuple[str, ...] = ("pearson", "spearman")
DEFAULT_METRICS = {"classification": ("macro_f1", "accuracy"), "regression": ("pearson", "spearman")}
DEFAULT_TEXT_COLUMNS = ("text",)
DEFAULT_LABEL_COLUMN = "label"
DEFAULT_HUB_SPLITS = {"train": "train", "dev": "validation"}

#: Keys a described task (``task: "custom"``) reads; of them, a registered task reads ``primary_metric`` (and QA
#: ``dev_file``) too.
CUSTOM_KEYS: tuple[str, ...] = (
    "dev_file", "test_file", "format", "text_columns", "task_type", "labels", "metrics", "primary_metric",
    "hub_config", "hub_train_split", "hub_test_split",
)
_FILE_KEYS = ("train_file", "dev_file", "test_file")
_QA_ONLY_KEYS = ("version", "doc_stride", "max_query_length", "max_answer_length", "null_score_diff_threshold")


def is_described(config: "DataConfig") -> bool:
    """Whether ``config`` describes its task (``task: "custom"``) rather than naming a preset."""
    return config.task == CUSTOM


def task_spec(config: "DataConfig", path: str = "kdqat.data.task") -> TaskSpec:
    """The task of ``config``: the described one, or the registered preset it names, with ``primary_metric``
    (when set) as the metric that picks the best checkpoint and heads the results."""
    if is_described(config):
        return described_spec(config)
    spec = get_task(config.task, path)
    if config.primary_metric is None or config.primary_metric == spec.primary_metric:
        return spec
    validate_primary_metric(config.primary_metric, spec, path.rsplit(".", 1)[0] + ".primary_metric")
    return spec.with_primary_metric(config.primary_metric)


def validate_primary_metric(name: Any, spec: TaskSpec, path: str) -> None:
    """``name`` (a ``primary_metric`` setting; None = the task's default) is one of ``spec``'s metrics; a
    :class:`ConfigError` at ``path`` naming the allowed values otherwise."""
    if name is None:
        return
    if not isinstance(name, str) or name not in spec.metrics:
        allowed = ", ".join(json.dumps(m) for m in spec.metrics)
        raise ConfigError(path, f"got {json.dumps(name)}; allowed for task {spec.name!r}: {allowed} "
                                f"(default {json.dumps(spec.primary_metric)})")


def task_type(config: "DataConfig") -> str:
    return config.task_type or "classification"


def text_columns(config: "DataConfig") -> tuple[str, ...]:
    return tuple(config.text_columns) if config.text_columns is not None else DEFAULT_TEXT_COLUMNS


def label_column(config: "DataConfig") -> str:
    return config.label_column or DEFAULT_LABEL_COLUMN


def metrics(config: "DataConfig") -> tuple[str, ...]:
    return tuple(config.metrics) if config.metrics is not None else DEFAULT_METRICS[task_type(config)]


def split_sources(config: "DataConfig") -> dict[str, str]:
    """Split name -> its file (source ``local``) or hub split name (source ``hub``); ``train`` first."""
    if config.source == "hub":
        splits = {"train": config.hub_train_split or DEFAULT_HUB_SPLITS["train"],
                  "dev": config.hub_dev_split or DEFAULT_HUB_SPLITS["dev"]}
        if config.hub_test_split is not None:
            splits["test"] = config.hub_test_split
        return splits
    splits = {"train": config.train_file, "dev": config.dev_file}
    if config.test_file is not None:
        splits["test"] = config.test_file
    return splits


def described_spec(config: "DataConfig") -> TaskSpec:
    """The :class:`TaskSpec` of a description (``config`` validated). Its ``split_files`` maps each split to
    its file path or hub split name; a classification without ``labels`` has ``labels_from_data``."""
    regression = task_type(config) == "regression"
    chosen = metrics(config)
    labels = tuple(config.labels) if config.labels is not None else ()
    return TaskSpec(
        name=CUSTOM, text_fields=text_columns(config), label_field=label_column(config), labels=labels,
        is_regression=regression, metrics=chosen, primary_metric=config.primary_metric or chosen[0],
        split_files=split_sources(config), labels_from_data=not regression and not labels,
    )


def discover_labels(labels: Iterable[str]) -> tuple[str, ...]:
    """The class names of a classification task from its training labels: the distinct values, sorted
    (as numbers when every one is an integer, so ``"2"`` comes before ``"10"``)."""
    distinct = set(labels)
    if all(_is_integer(label) for label in distinct):
        return tuple(sorted(distinct, key=lambda label: (int(label), label)))
    return tuple(sorted(distinct))


def _is_integer(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------------------------- validation


def validate_description(config: "DataConfig", path: str) -> None:
    """Check the keys of a described task; :class:`ConfigError` at the first bad one's key path."""
    if config.source == "local":
        for key in ("train_file", "dev_file"):
            if getattr(config, key) is None:
                raise ConfigError(f"{path}.{key}", f"required for task '{CUSTOM}' with source 'local': a CSV, TSV, "
                                  "JSON Lines or Parquet file")
        for key in ("hub_id", "hub_config", "hub_train_split", "hub_dev_split", "hub_test_split"):
            if getattr(config, key) is not None:
                raise ConfigError(f"{path}.{key}", "only with source 'hub'")
    else:
        if config.hub_id is None:
            raise ConfigError(f"{path}.hub_id", f"required for task '{CUSTOM}' with source 'hub': the dataset's hub "
                              "id (datasets.load_dataset(hub_id, hub_config))")
        for key in ("dev_file", "test_file"):
            if getattr(config, key) is not None:
                raise ConfigError(f"{path}.{key}", "with source 'hub' the evaluation splits come from the hub "
                                  "(hub_dev_split, hub_test_split); only train_file may replace the train split")
        for key in ("hub_config", "hub_train_split", "hub_dev_split", "hub_test_split"):
            _check_string(getattr(config, key), f"{path}.{key}")
    if config.data_dir is not None:
        raise ConfigError(f"{path}.data_dir", f"task '{CUSTOM}' reads train_file / dev_file / test_file, not a folder")
    for key in _QA_ONLY_KEYS:
        if getattr(config, key, None) is not None:
            raise ConfigError(f"{path}.{key}", f"only for a question-answering task ('squad'); task is '{CUSTOM}'")
    if config.image_column is not None:
        raise ConfigError(f"{path}.image_column", f"only for task 'hub_images' (task is '{CUSTOM}')")
    if config.format is not None and config.format not in FORMATS:
        raise ConfigError(f"{path}.format", f"{config.format!r} is not one of {list(FORMATS)} (null: from the "
                          "file extension)")
    for key in _FILE_KEYS:
        value = getattr(config, key)
        if value is not None and format_of(value, config.format) is None:
            raise ConfigError(f"{path}.{key}", f"cannot tell the format of {value!r} from its extension; name the "
                              f"file .csv, .tsv, .jsonl or .parquet, or set {path}.format to one of {list(FORMATS)}")
    _validate_columns(config, path)
    _validate_scoring(config, path)


def _check_string(value: Any, path: str) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError(path, f"expected a non-empty string or null, got {value!r}")


def _validate_columns(config: "DataConfig", path: str) -> None:
    columns = config.text_columns
    if columns is not None:
        if not isinstance(columns, list) or len(columns) not in (1, 2):
            raise ConfigError(f"{path}.text_columns", f"expected a list of one or two column names, got {columns!r}")
        for i, name in enumerate(columns):
            _check_string(name, f"{path}.text_columns[{i}]")
        if len(set(columns)) != len(columns):
            raise ConfigError(f"{path}.text_columns", f"the two text columns are the same column {columns[0]!r}")
    if label_column(config) in text_columns(config):
        raise ConfigError(f"{path}.label_column", f"{label_column(config)!r} is also a text column")


def _validate_scoring(config: "DataConfig", path: str) -> None:
    if config.task_type is not None and config.task_type not in TASK_TYPES:
        raise ConfigError(f"{path}.task_type", f"{config.task_type!r} is not one of {list(TASK_TYPES)}")
    kind = task_type(config)
    if config.labels is not None:
        if kind == "regression":
            raise ConfigError(f"{path}.labels", "a regression task has no classes (its label is a number)")
        if len(config.labels) < 2 or any(not isinstance(x, str) or not x.strip() for x in config.labels):
            raise ConfigError(f"{path}.labels", f"expected at least two non-empty class names, got {config.labels!r}")
        if len(set(config.labels)) != len(config.labels):
            raise ConfigError(f"{path}.labels", f"a class name appears twice in {config.labels}")
    allowed = CLASSIFICATION_METRICS if kind == "classification" else REGRESSION_METRICS
    if config.metrics is not None:
        if not config.metrics:
            raise ConfigError(f"{path}.metrics", f"expected at least one of {list(allowed)}")
        for i, name in enumerate(config.metrics):
            if name not in allowed:
                raise ConfigError(f"{path}.metrics[{i}]", f"{name!r} is not a {kind} metric; allowed: {list(allowed)}")
    chosen = metrics(config)
    if config.primary_metric is not None and config.primary_metric not in chosen:
        raise ConfigError(f"{path}.primary_metric", f"{config.primary_metric!r} is not among the metrics {list(chosen)}")
