"""The ``kdqat.data`` keys of the extractive-QA task (``task: "squad"``): checked here, turned into
:class:`~ds_kdqat.data.qa.QASettings`.

=============================  ==========  =====================================================================
key                            default     meaning
=============================  ==========  =====================================================================
``train_file``, ``dev_file``   —           SQuAD JSON files (else ``data_dir/train.json``, ``data_dir/dev.json``)
``version``                    1           1 = SQuAD v1.1 (every question answered), 2 = v2.0 (unanswerable ones)
``doc_stride``                 128         tokens shared by consecutive context windows
``max_query_length``           64          question tokens kept
``max_answer_length``          30          longest predicted answer, in tokens
``null_score_diff_threshold``  0.0         v2.0: answer "" when null score − best span score exceeds it
=============================  ==========  =====================================================================

These keys are refused for every other task; ``dev_file`` is QA's only.
"""

from __future__ import annotations

from typing import Any, Callable

from ds_kdqat.configtools import is_finite_number, is_int
from ds_kdqat.data.qa import QASettings
from ds_kdqat.errors import ConfigError

QA_KEYS = ("dev_file", "version", "doc_stride", "max_query_length", "max_answer_length", "null_score_diff_threshold")
_SPECIAL_TOKENS = 3  # [CLS] question [SEP] context [SEP]


def qa_settings(config: Any) -> QASettings:
    """The QA settings of a :class:`~ds_kdqat.data.config.DataConfig` (defaults for unset keys)."""
    defaults = QASettings()
    values = {key: getattr(config, key) for key in QA_KEYS if key != "dev_file"}
    return QASettings(max_seq_length=config.max_seq_length,
                      **{k: (getattr(defaults, k) if v is None else v) for k, v in values.items()})


def validate_qa_keys(config: Any, spec: Any, path: str) -> None:
    """ConfigError at ``path.<key>`` for a QA key outside a QA task, a missing file or a bad value."""
    if not spec.is_qa:
        for key in QA_KEYS:
            if getattr(config, key) is not None:
                raise ConfigError(f"{path}.{key}", f"only for a question-answering task ('squad'); task is "
                                                   f"{config.task!r}")
        return
    if config.source != "local":
        raise ConfigError(f"{path}.source", "task 'squad' reads local SQuAD JSON files; use 'local'")
    for key in ("train_file", "dev_file"):
        if getattr(config, key) is None and config.data_dir is None:
            raise ConfigError(f"{path}.{key}", f"required for task {config.task!r} (a SQuAD JSON file), unless "
                                               "data_dir holds train.json and dev.json")
    if config.dev_file is not None and (not isinstance(config.dev_file, str) or not config.dev_file):
        raise ConfigError(f"{path}.dev_file", f"expected a non-empty path string or null, got {config.dev_file!r}")
    if config.version is not None and (not is_int(config.version) or config.version not in (1, 2)):
        raise ConfigError(f"{path}.version", f"got {config.version!r}; allowed: 1 (SQuAD v1.1), 2 (SQuAD v2.0)")
    for key in ("doc_stride", "max_query_length", "max_answer_length"):
        value = getattr(config, key)
        if value is not None and (not is_int(value) or value < 1):
            raise ConfigError(f"{path}.{key}", f"expected null or an integer >= 1, got {value!r}")
    threshold = config.null_score_diff_threshold
    if threshold is not None and not is_finite_number(threshold):
        raise ConfigError(f"{path}.null_score_diff_threshold", f"expected a finite number, got {threshold!r}")
    check_qa_window(qa_settings(config), lambda key: f"{path}.{key}")


def check_qa_window(settings: QASettings, where: Callable[[str], str]) -> None:
    """ConfigError at ``where(key)`` when a window of ``settings`` leaves no token for the context, or its stride
    is not below the context room (``max_seq_length − max_query_length − 3``)."""
    room = settings.max_seq_length - settings.max_query_length - _SPECIAL_TOKENS
    if room < 1:
        raise ConfigError(where("max_query_length"), f"got {settings.max_query_length}; with max_seq_length "
                          f"{settings.max_seq_length} no context token is left")
    if settings.doc_stride >= room:
        raise ConfigError(where("doc_stride"), f"got {settings.doc_stride}; must be below the context room of a "
                          f"window, max_seq_length - max_query_length - 3 = {room}")


def qa_file(config: Any, split: str) -> str:
    """The SQuAD JSON file of ``split`` (``"train"`` / ``"dev"``): ``train_file``/``dev_file``, else
    ``data_dir/<split>.json``."""
    import os

    named = {"train": config.train_file, "dev": config.dev_file}.get(split)
    if named is not None:
        return named
    if config.data_dir is None:
        raise ConfigError(f"kdqat.data.{split}_file", "required for task 'squad'")
    return os.path.join(config.data_dir, f"{split}.json")


def load_qa_split(config: Any, split: str, tokenizer: Any):
    """The encoded :class:`~ds_kdqat.data.qa.QADataset` of ``split``; ``max_train_examples`` /
    ``max_eval_examples`` keep the first N questions."""
    from ds_kdqat.data.qa import encode_qa, read_squad

    settings = qa_settings(config)
    examples = read_squad(qa_file(config, split), settings.version)
    limit = config.max_train_examples if split == "train" else config.max_eval_examples
    return encode_qa(examples[:limit] if limit is not None else examples, tokenizer, settings)
