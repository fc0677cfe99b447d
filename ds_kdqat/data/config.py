"""Typed config of the data section (``kdqat.data``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

from ds_kdqat.data.description import CUSTOM, CUSTOM_KEYS, validate_description, validate_primary_metric
from ds_kdqat.data.glue_format import ON_BAD_ROW_CHOICES
from ds_kdqat.data.tasks import TASKS, get_task
from ds_kdqat.configtools import is_int
from ds_kdqat.errors import ConfigError

SOURCE_CHOICES: tuple[str, ...] = ("local", "hub")
IMAGE_FOLDER, HUB_IMAGES = "image_folder", "hub_images"
HUB_IMAGE_KEYS = ("hub_id", "image_column", "label_column", "hub_dev_split")
MIN_SEQ_LENGTH = 8


@dataclass
class DataConfig:
    """Which task, where its data comes from, and how much of it is used.

    Attributes:
        task: a name of :data:`ds_kdqat.data.tasks.TASKS` (default: the embedded ``rt_polarity``).
        source: ``"local"`` reads GLUE-format tsv files; ``"hub"`` calls ``datasets.load_dataset`` with the
            task's hub id (needs internet or a populated HF cache).
        data_dir: local GLUE-format folder of the task (``train.tsv``, ``dev.tsv`` / MNLI's
            ``dev_matched.tsv`` and ``dev_mismatched.tsv``). Required for a GLUE task with source
            ``"local"``. For ``rt_polarity`` it is optional: when set, the task's ``train.tsv``/``dev.tsv`` are
            read from it (never written); when unset, the built-in split is materialised under the cache
            directory handed to :func:`ds_kdqat.data.loading.load_split`. A data folder is only ever read.
        train_file: a train file in the task's tsv layout (an augmented train set) used instead of the
            task's train split, whatever the source.
        max_seq_length: tokens per example after truncation, special tokens included.
        on_bad_row: ``"error"`` stops at the first bad row of a local file; ``"skip"`` leaves bad rows out and
            logs each one with its file:line.
        dev_fraction: share of each label held out as dev for ``rt_polarity`` (0 < f < 1).
        split_seed: seed of the ``rt_polarity`` split.
        max_train_examples: use only the first N train examples (quick runs); None for all.
        max_eval_examples: use only the first N examples of each evaluation split; None for all.
        primary_metric: the metric that picks the best checkpoint and heads the results (``results.json``'s
            ``primary_metric``, the sweep tables), overriding the task's default; one of the task's metrics
            (e.g. ``"spearman"`` for ``stsb``, whose default is ``"pearson"``; ``"accuracy"`` for ``mrpc``/``qqp``,
            whose default is ``"f1"``). None keeps the task's default.

    Extractive QA (``squad``): ``train_file``/``dev_file`` (SQuAD JSON) and the keys of
    :mod:`ds_kdqat.data.qa_config` (``version``, ``doc_stride``, ``max_query_length``, ``max_answer_length``,
    ``null_score_diff_threshold``), refused for other tasks.

    Image tasks (``digits``, ``image_folder``, ``hub_images``; :mod:`ds_kdqat.data.images`) use ``data_dir``
    (``image_folder``: ``data_dir/train/<class>/`` and ``data_dir/dev/<class>/``), ``on_bad_row`` (an unreadable
    image), ``dev_fraction``/``split_seed`` (``digits``), the two limits, and for ``hub_images`` only:

        hub_id: the dataset's hub id (``datasets.load_dataset(hub_id, split=...)``).
        image_column: its image column (default ``"image"``).
        label_column: its label column (default ``"label"``).
        hub_dev_split: the hub split used as dev (default ``"validation"``; e.g. ``"test"`` for CIFAR-10).

    A task from a description (``task: "custom"``, see :mod:`ds_kdqat.data.description`) reads ``train_file``
    (the train split), ``dev_file``, ``test_file``, ``format``, ``text_columns``, ``label_column``, ``task_type``,
    ``labels``, ``metrics`` (its ``primary_metric`` defaults to the first), and with source ``"hub"``
    ``hub_id``, ``hub_config``, ``hub_train_split``, ``hub_dev_split``, ``hub_test_split``.
    """

    task: str = "rt_polarity"
    source: Literal["local", "hub"] = "local"
    data_dir: Optional[str] = None
    train_file: Optional[str] = None
    max_seq_length: int = 128
    on_bad_row: Literal["error", "skip"] = "error"
    dev_fraction: float = 0.1
    split_seed: int = 42
    max_train_examples: Optional[int] = None
    max_eval_examples: Optional[int] = None
    hub_id: Optional[str] = None
    image_column: Optional[str] = None
    label_column: Optional[str] = None
    hub_dev_split: Optional[str] = None
    # extractive QA (task "squad"): see ds_kdqat.data.qa_config
    dev_file: Optional[str] = None
    version: Optional[int] = None
    doc_stride: Optional[int] = None
    max_query_length: Optional[int] = None
    max_answer_length: Optional[int] = None
    null_score_diff_threshold: Optional[float] = None
    # a task from a description (task "custom", which reads dev_file too): see ds_kdqat.data.description
    test_file: Optional[str] = None
    format: Optional[str] = None
    text_columns: Optional[list[str]] = None
    task_type: Optional[str] = None
    labels: Optional[list[str]] = None
    metrics: Optional[list[str]] = None
    primary_metric: Optional[str] = None
    hub_config: Optional[str] = None
    hub_train_split: Optional[str] = None
    hub_test_split: Optional[str] = None

    def validate(self, path: str = "kdqat.data") -> None:
        """Raise :class:`ConfigError` naming the key path and the allowed values for the first bad field."""
        if not isinstance(self.task, str):
            raise ConfigError(f"{path}.task", f"expected a task name, one of {sorted(TASKS)}, or '{CUSTOM}'")
        if self.source not in SOURCE_CHOICES:
            raise ConfigError(f"{path}.source", f"{self.source!r} is not one of {list(SOURCE_CHOICES)}")
        for key in ("data_dir", "train_file", "dev_file", "test_file", *HUB_IMAGE_KEYS):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                what = "path string" if key in ("data_dir", "train_file", "dev_file", "test_file") else "string"
                raise ConfigError(f"{path}.{key}", f"expected a non-empty {what} or null, got {value!r}")
        if self.task == CUSTOM:
            validate_description(self, path)
        else:
            self._validate_preset(path)
        self._validate_common(path)

    def _validate_preset(self, path: str) -> None:
        """The keys of a registered task (GLUE, rt_polarity, image tasks)."""
        if self.task not in TASKS:
            raise ConfigError(f"{path}.task", f"unknown task {self.task!r}; known tasks: {', '.join(sorted(TASKS))}, "
                              f"or '{CUSTOM}' for a task described by its files and columns")
        spec = get_task(self.task, f"{path}.task")
        for key in CUSTOM_KEYS:
            # dev_file: QA's too, checked there; primary_metric: any task's, checked below
            if key not in ("dev_file", "primary_metric") and getattr(self, key) is not None:
                raise ConfigError(f"{path}.{key}", f"only for task '{CUSTOM}' (task is {self.task!r}, whose files, "
                                  "columns and metrics are fixed)")
        validate_primary_metric(self.primary_metric, spec, f"{path}.primary_metric")
        if self.source == "hub" and spec.hub_id is None and spec.name != HUB_IMAGES:
            hint = f"; for an image dataset on the hub use task '{HUB_IMAGES}'" if spec.is_image else ""
            raise ConfigError(f"{path}.source", f"task {self.task!r} is not on the hub; use 'local'{hint}")
        self._validate_image_keys(spec, path)
        from ds_kdqat.data.qa_config import validate_qa_keys  # noqa: PLC0415 - qa imports torch

        validate_qa_keys(self, spec, path)
        if self.source == "local" and not spec.embedded and not spec.is_image and not spec.is_qa \
                and self.data_dir is None:
            files = ", ".join(spec.split_files.values())
            raise ConfigError(
                f"{path}.data_dir",
                f"required for task {self.task!r} with source 'local': a GLUE-format folder holding {files}",
            )

    def _validate_common(self, path: str) -> None:
        """The keys every task reads."""
        if not is_int(self.max_seq_length) or self.max_seq_length < MIN_SEQ_LENGTH:
            raise ConfigError(f"{path}.max_seq_length", f"expected an integer >= {MIN_SEQ_LENGTH}, got {self.max_seq_length!r}")
        if self.on_bad_row not in ON_BAD_ROW_CHOICES:
            raise ConfigError(f"{path}.on_bad_row", f"{self.on_bad_row!r} is not one of {list(ON_BAD_ROW_CHOICES)}")
        if (
            isinstance(self.dev_fraction, bool)
            or not isinstance(self.dev_fraction, (int, float))
            or not math.isfinite(self.dev_fraction)
            or not 0.0 < self.dev_fraction < 1.0
        ):
            raise ConfigError(f"{path}.dev_fraction", f"expected a number in (0, 1), got {self.dev_fraction!r}")
        if not is_int(self.split_seed):
            raise ConfigError(f"{path}.split_seed", f"expected an integer, got {self.split_seed!r}")
        for key in ("max_train_examples", "max_eval_examples"):
            value = getattr(self, key)
            if value is not None and (not is_int(value) or value < 1):
                raise ConfigError(f"{path}.{key}", f"expected null or an integer >= 1, got {value!r}")

    def _validate_image_keys(self, spec, path: str) -> None:
        """The keys of the image tasks: each where its task reads it, nowhere else."""
        if spec.name != HUB_IMAGES:
            for key in HUB_IMAGE_KEYS:
                if getattr(self, key) is not None:
                    raise ConfigError(f"{path}.{key}", f"only for task '{HUB_IMAGES}' (task is {self.task!r})")
        if not spec.is_image:
            return
        if self.train_file is not None:
            raise ConfigError(f"{path}.train_file", f"a text train file; task {self.task!r} is an image task")
        if spec.name == HUB_IMAGES and self.hub_id is None:
            raise ConfigError(f"{path}.hub_id", f"required for task '{HUB_IMAGES}': the dataset's hub id "
                              "(datasets.load_dataset), with image_column and label_column if not image / label")
        if spec.name == IMAGE_FOLDER and self.data_dir is None:
            raise ConfigError(f"{path}.data_dir", f"required for task '{IMAGE_FOLDER}': a folder holding "
                              "train/<class>/*.png|jpg and dev/<class>/*.png|jpg")
        if spec.name != IMAGE_FOLDER and self.data_dir is not None:
            raise ConfigError(f"{path}.data_dir", f"task {self.task!r} reads no folder; for your own images use task "
                              f"'{IMAGE_FOLDER}'")
