"""Task registry: what each task's files look like, what its labels are and how it is scored.

A :class:`TaskSpec` describes one text-classification (or regression) task in two layouts:

* the distributed GLUE tsv layout (``train.tsv``, ``dev.tsv``, ...), read and written by
  :mod:`ds_kdqat.data.glue_format`;
* the dataset hub layout (``datasets.load_dataset(*hub_id, split=...)``), read by :mod:`ds_kdqat.data.loading`.

Labels are kept as the raw strings of the tsv files (``"0"``, ``"entailment"``, ...); a class index is the
position of the raw label in :attr:`TaskSpec.labels`. Regression tasks (STS-B) have no label list and a
float score as label.

Image tasks (``kind="image_classification"``, read by :mod:`ds_kdqat.data.images`): ``digits`` (scikit-learn's
bundled 8×8 digits, the offline image default), ``image_folder`` (``data_dir/{train,dev}/<class>/*.png``) and
``hub_images`` (a hub dataset with an image and a label column). The last two take their class names from the
data (``labels_from_data``): the registry spec has none, :meth:`TaskSpec.with_labels` fills them in.

``TASKS`` is filled by the small registration functions at the bottom of this module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from ds_kdqat.errors import ConfigError

#: Metric names understood by :mod:`ds_kdqat.data.metrics`.
METRIC_NAMES = ("accuracy", "f1", "macro_f1", "micro_f1", "mcc", "pearson", "spearman")
#: What a task's examples are: text (one or two sentences, tokenised) or images (pixel_values).
TASK_KINDS = ("text", "image_classification", "qa")
#: Metric names of extractive QA (``kind="qa"``), computed by :mod:`ds_kdqat.data.qa_metrics`.
QA_METRIC_NAMES = ("exact_match", "f1")


@dataclass(frozen=True)
class TaskSpec:
    """One task: its fields, labels, metrics and file layouts.

    Attributes:
        name: registry key (``"cola"``, ``"mnli"``, ...).
        text_fields: one or two column names holding the text(s) (``text_a`` [, ``text_b``]).
        label_field: column name of the label.
        labels: raw label strings in class-index order; empty for regression.
        is_regression: True when the label is a float score (STS-B).
        metrics: metric names computed at evaluation, in report order.
        primary_metric: the metric (one of ``metrics``) that picks the best checkpoint; a config may choose
            another of ``metrics`` (``kdqat.data.primary_metric``, :meth:`with_primary_metric`).
        has_header: whether the tsv files start with a header line naming the columns.
        columns: names of the positional columns of header-less files (CoLA); empty when ``has_header``.
        split_files: split name -> file name inside the task directory. ``"train"`` is always present; the
            others are evaluation splits, the first of them being the one the primary metric is read on.
        hub_id: positional arguments of ``datasets.load_dataset`` (``("nyu-mll/glue", "cola")``), or None
            when the task is not on the hub.
        hub_splits: split name -> hub split name (``"dev"`` -> ``"validation"``).
        hub_text_fields: the hub's text column names, aligned with ``text_fields``.
        hub_label_field: the hub's label column name.
        hub_label_map: hub class name -> raw label, in hub class-index order (classification only).
        embedded: True for the task built from packaged data (materialised by :mod:`ds_kdqat.data.embedded`).
        kind: ``"text"`` or ``"image_classification"`` (:data:`TASK_KINDS`); an image task's ``text_fields`` is
            ``("image",)`` and its splits are read by :mod:`ds_kdqat.data.images`.
        labels_from_data: the class names come from the data (folder names, the hub's class names), so the
            registered spec has none; :meth:`with_labels` returns the spec with them.
    """

    name: str
    text_fields: tuple[str, ...]
    label_field: str
    labels: tuple[str, ...]
    is_regression: bool
    metrics: tuple[str, ...]
    primary_metric: str
    has_header: bool = True
    columns: tuple[str, ...] = ()
    split_files: dict[str, str] = field(default_factory=lambda: {"train": "train.tsv", "dev": "dev.tsv"})
    hub_id: Optional[tuple[str, ...]] = None
    hub_splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "dev": "validation"})
    hub_text_fields: tuple[str, ...] = ()
    hub_label_field: str = "label"
    hub_label_map: dict[str, str] = field(default_factory=dict)
    embedded: bool = False
    kind: str = "text"
    labels_from_data: bool = False

    def __post_init__(self) -> None:
        where = f"task {self.name!r}"
        if self.kind not in TASK_KINDS:
            raise ValueError(f"{where}: kind {self.kind!r} is not one of {TASK_KINDS}")
        if self.kind == "image_classification" and self.is_regression:
            raise ValueError(f"{where}: an image classification task is not a regression")
        if len(self.text_fields) not in (1, 2):
            raise ValueError(f"{where}: text_fields must name one or two columns, got {self.text_fields}")
        if self.labels_from_data:
            if self.labels or self.is_regression:
                raise ValueError(f"{where}: labels_from_data is for a classification task without a label list")
        elif self.kind != "qa" and self.is_regression == bool(self.labels):
            raise ValueError(f"{where}: a regression task has no label list, a classification task needs one")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"{where}: duplicate labels in {self.labels}")
        known = QA_METRIC_NAMES if self.kind == "qa" else METRIC_NAMES
        unknown = [m for m in self.metrics if m not in known]
        if unknown or not self.metrics:
            raise ValueError(f"{where}: metrics {self.metrics} must be non-empty names from {known}")
        if self.primary_metric not in self.metrics:
            raise ValueError(f"{where}: primary_metric {self.primary_metric!r} is not in {self.metrics}")
        if self.has_header == bool(self.columns):
            raise ValueError(f"{where}: give `columns` exactly when the files have no header")
        if not self.has_header:
            missing = [c for c in (*self.text_fields, self.label_field) if c not in self.columns]
            if missing:
                raise ValueError(f"{where}: fields {missing} are not among columns {self.columns}")
        if "train" not in self.split_files or len(self.split_files) < 2:
            raise ValueError(f"{where}: split_files needs 'train' and at least one evaluation split")
        if self.hub_id is not None:
            if set(self.hub_splits) != set(self.split_files):
                raise ValueError(f"{where}: hub_splits {sorted(self.hub_splits)} != splits {sorted(self.split_files)}")
            if len(self.hub_text_fields) != len(self.text_fields):
                raise ValueError(f"{where}: hub_text_fields must align with text_fields")
            if not self.is_regression and sorted(self.hub_label_map.values()) != sorted(self.labels):
                raise ValueError(f"{where}: hub_label_map values must be the labels {self.labels}")

    @property
    def is_qa(self) -> bool:
        """True for extractive question answering (SQuAD JSON, read by :mod:`ds_kdqat.data.qa`)."""
        return self.kind == "qa"

    @property
    def is_image(self) -> bool:
        """True for an image task (``pixel_values`` inputs, read by :mod:`ds_kdqat.data.images`)."""
        return self.kind == "image_classification"

    def with_labels(self, labels: Sequence[str]) -> "TaskSpec":
        """This spec with the class names read from the data (a task with ``labels_from_data``)."""
        if not self.labels_from_data:
            raise ValueError(f"task {self.name!r} has a fixed label list {self.labels}")
        return dataclasses.replace(self, labels=tuple(labels), labels_from_data=False)

    def with_primary_metric(self, name: str) -> "TaskSpec":
        """This spec with ``name`` (one of its metrics) picking the best checkpoint instead of its default
        (``kdqat.data.primary_metric``; e.g. Spearman for STS-B, as the GLUE papers report it)."""
        if name not in self.metrics:
            raise ValueError(f"task {self.name!r}: primary_metric {name!r} is not in {self.metrics}")
        return dataclasses.replace(self, primary_metric=name)

    @property
    def is_pair(self) -> bool:
        """True when examples have two texts (``text_b`` is set)."""
        return len(self.text_fields) == 2

    @property
    def num_labels(self) -> int:
        """Output size of the classifier head: the number of classes, or 1 for regression."""
        return 1 if self.is_regression else len(self.labels)

    @property
    def splits(self) -> tuple[str, ...]:
        """All split names, ``"train"`` first."""
        return ("train", *(s for s in self.split_files if s != "train"))

    @property
    def eval_splits(self) -> tuple[str, ...]:
        """The evaluation splits; the first is where the primary metric picks the best checkpoint."""
        return tuple(s for s in self.split_files if s != "train")

    def label_index(self) -> dict[str, int]:
        """Raw label -> class index."""
        return {label: i for i, label in enumerate(self.labels)}


TASKS: dict[str, TaskSpec] = {}


def register_task(fn: Callable[[], TaskSpec]) -> Callable[[], TaskSpec]:
    """Decorator: call ``fn`` once and file its spec under ``spec.name``."""
    spec = fn()
    if spec.name in TASKS:
        raise ValueError(f"task {spec.name!r} registered twice")
    TASKS[spec.name] = spec
    return fn


def get_task(name: str, path: str = "task") -> TaskSpec:
    """The spec registered as ``name``; a :class:`ConfigError` at ``path`` listing the known names otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(path, f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None


GLUE = "nyu-mll/glue"
_ZERO_ONE = ("0", "1")


@register_task
def cola() -> TaskSpec:
    # train.tsv / dev.tsv have no header: source, label, label notes, sentence.
    return TaskSpec(
        name="cola", text_fields=("sentence",), label_field="label", labels=_ZERO_ONE, is_regression=False,
        metrics=("mcc",), primary_metric="mcc",
        has_header=False, columns=("source", "label", "label_notes", "sentence"),
        hub_id=(GLUE, "cola"), hub_text_fields=("sentence",),
        hub_label_map={"unacceptable": "0", "acceptable": "1"},
    )


@register_task
def sst2() -> TaskSpec:
    return TaskSpec(
        name="sst2", text_fields=("sentence",), label_field="label", labels=_ZERO_ONE, is_regression=False,
        metrics=("accuracy",), primary_metric="accuracy",
        hub_id=(GLUE, "sst2"), hub_text_fields=("sentence",),
        hub_label_map={"negative": "0", "positive": "1"},
    )


@register_task
def mrpc() -> TaskSpec:
    return TaskSpec(
        name="mrpc", text_fields=("#1 String", "#2 String"), label_field="Quality", labels=_ZERO_ONE,
        is_regression=False, metrics=("f1", "accuracy"), primary_metric="f1",
        hub_id=(GLUE, "mrpc"), hub_text_fields=("sentence1", "sentence2"),
        hub_label_map={"not_equivalent": "0", "equivalent": "1"},
    )


@register_task
def stsb() -> TaskSpec:
    # Pearson picks the best checkpoint by default; TernaryBERT and its follow-ups report Spearman:
    # kdqat.data.primary_metric = "spearman" (the ds_configs/paper/*_stsb.json configs set it).
    return TaskSpec(
        name="stsb", text_fields=("sentence1", "sentence2"), label_field="score", labels=(), is_regression=True,
        metrics=("pearson", "spearman"), primary_metric="pearson",
        hub_id=(GLUE, "stsb"), hub_text_fields=("sentence1", "sentence2"),
    )


@register_task
def qqp() -> TaskSpec:
    return TaskSpec(
        name="qqp", text_fields=("question1", "question2"), label_field="is_duplicate", labels=_ZERO_ONE,
        is_regression=False, metrics=("f1", "accuracy"), primary_metric="f1",
        hub_id=(GLUE, "qqp"), hub_text_fields=("question1", "question2"),
        hub_label_map={"not_duplicate": "0", "duplicate": "1"},
    )


@register_task
def mnli() -> TaskSpec:
    # Class order of the original BERT/TernaryBERT GLUE processors; the hub orders them differently and
    # hub_label_map translates.
    return TaskSpec(
        name="mnli", text_fields=("sentence1", "sentence2"), label_field="gold_label",
        labels=("contradiction", "entailment", "neutral"), is_regression=False,
        metrics=("accuracy",), primary_metric="accuracy",
        split_files={"train": "train.tsv", "dev_matched": "dev_matched.tsv",
                     "dev_mismatched": "dev_mismatched.tsv"},
        hub_id=(GLUE, "mnli"),
        hub_splits={"train": "train", "dev_matched": "validation_matched",
                    "dev_mismatched": "validation_mismatched"},
        hub_text_fields=("premise", "hypothesis"),
        hub_label_map={"entailment": "entailment", "neutral": "neutral", "contradiction": "contradiction"},
    )


@register_task
def qnli() -> TaskSpec:
    return TaskSpec(
        name="qnli", text_fields=("question", "sentence"), label_field="label",
        labels=("entailment", "not_entailment"), is_regression=False,
        metrics=("accuracy",), primary_metric="accuracy",
        hub_id=(GLUE, "qnli"), hub_text_fields=("question", "sentence"),
        hub_label_map={"entailment": "entailment", "not_entailment": "not_entailment"},
    )


@register_task
def rte() -> TaskSpec:
    return TaskSpec(
        name="rte", text_fields=("sentence1", "sentence2"), label_field="label",
        labels=("entailment", "not_entailment"), is_regression=False,
        metrics=("accuracy",), primary_metric="accuracy",
        hub_id=(GLUE, "rte"), hub_text_fields=("sentence1", "sentence2"),
        hub_label_map={"entailment": "entailment", "not_entailment": "not_entailment"},
    )


@register_task
def wnli() -> TaskSpec:
    return TaskSpec(
        name="wnli", text_fields=("sentence1", "sentence2"), label_field="label", labels=_ZERO_ONE,
        is_regression=False, metrics=("accuracy",), primary_metric="accuracy",
        hub_id=(GLUE, "wnli"), hub_text_fields=("sentence1", "sentence2"),
        hub_label_map={"not_entailment": "0", "entailment": "1"},
    )


@register_task
def rt_polarity() -> TaskSpec:
    # The embedded default: the 4,000 Rotten Tomatoes sentences shipped by Debian's python3-pattern,
    # materialised in the SST-2 layout. On the hub, the full Rotten Tomatoes data (10,662 sentences).
    return TaskSpec(
        name="rt_polarity", text_fields=("sentence",), label_field="label", labels=_ZERO_ONE,
        is_regression=False, metrics=("accuracy",), primary_metric="accuracy",
        hub_id=("cornell-movie-review-data/rotten_tomatoes",), hub_text_fields=("text",),
        hub_label_map={"neg": "0", "pos": "1"},
        embedded=True,
    )


# --- image tasks (read by ds_kdqat.data.images) ---------------------------------------------------------------
_IMAGE_SPLITS = {"train": "train", "dev": "dev"}


@register_task
def digits() -> TaskSpec:
    # The offline image default: scikit-learn's bundled 8x8 handwritten digits (1,797 images), split
    # deterministically and stratified by class (dev_fraction, split_seed), upscaled to the model's image size.
    return TaskSpec(
        name="digits", text_fields=("image",), label_field="label", labels=tuple(str(d) for d in range(10)),
        is_regression=False, metrics=("accuracy",), primary_metric="accuracy", split_files=dict(_IMAGE_SPLITS),
        kind="image_classification",
    )


@register_task
def image_folder() -> TaskSpec:
    # data_dir/train/<class>/*.png|jpg and data_dir/dev/<class>/...; class names = the sorted train folder names.
    return TaskSpec(
        name="image_folder", text_fields=("image",), label_field="label", labels=(), is_regression=False,
        metrics=("accuracy",), primary_metric="accuracy", split_files=dict(_IMAGE_SPLITS),
        kind="image_classification", labels_from_data=True,
    )


@register_task
def hub_images() -> TaskSpec:
    # datasets.load_dataset(data.hub_id) with data.image_column / data.label_column; class names from the label
    # column's ClassLabel names, else the sorted distinct train labels.
    return TaskSpec(
        name="hub_images", text_fields=("image",), label_field="label", labels=(), is_regression=False,
        metrics=("accuracy",), primary_metric="accuracy", split_files=dict(_IMAGE_SPLITS),
        kind="image_classification", labels_from_data=True,
    )


# --- extractive question answering (ds_kdqat.data.qa) ------------------------------------------------------------


@register_task
def squad() -> TaskSpec:
    # SQuAD v1.1 / v2.0 JSON (data.version); data.train_file / data.dev_file, or data_dir/{train,dev}.json.
    # Labels are token spans; metrics in percent, as the official scripts print them.
    return TaskSpec(
        name="squad", text_fields=("question", "context"), label_field="answers", labels=(), is_regression=False,
        metrics=("exact_match", "f1"), primary_metric="f1",
        split_files={"train": "train.json", "dev": "dev.json"}, kind="qa",
    )
