"""Batched prediction with an exported student: examples in, one :class:`Prediction` per example out.

    model = ds_kdqat.load_student("OUT/student_packed", "int8")
    predictor = Predictor(model)
    for prediction in predictor.predict(["a great film", "dull"], batch_size=32):
        print(prediction.record())   # {"label": "1", "probabilities": {"0": 0.08, "1": 0.92}}

What an example is, by the export's ``task.kind`` (its manifest, ``model.kdqat_export``):

* ``classification`` / ``regression``: a string, or for a task with two ``text_fields`` a pair
  ``(text_a, text_b)``. Texts are tokenised with the export's own tokenizer (``AutoTokenizer`` of the export
  folder), pairs as ``[CLS] a [SEP] b [SEP]``, truncated (longest first) to the task's ``max_seq_length``, as in
  training (:func:`ds_kdqat.data.encode.encode`).
* ``image_classification``: an image file path or a ``PIL.Image``; converted, resized and normalised as in
  training (:class:`ds_kdqat.data.image_encode.ImageFormat` from the export's ``preprocessor_config.json``).
* ``qa`` (extractive QA): a question, as a :class:`~ds_kdqat.data.qa.QAExample` or a mapping
  ``{"id", "question", "context"}``; one :class:`QAPrediction` ``(id, answer, score)`` per question. The
  questions are cut into windows exactly as in training (:func:`ds_kdqat.data.qa.build_features`: question
  truncated to ``max_query_length`` tokens, context windows of ``max_seq_length`` tokens overlapping by
  ``doc_stride``), the windows are batched (``batch_size`` windows per forward pass, in order, padded like the
  training collate) and each question's answer is decoded from its windows' start/end logits by
  :func:`ds_kdqat.data.qa_post.decide_answer` (n-best spans, ``max_answer_length``, and for SQuAD v2.0 the
  no-answer rule with ``null_score_diff_threshold``). Those settings are the export's ``task.qa`` entry (and
  ``task.max_seq_length``); an export that predates them uses the :class:`~ds_kdqat.data.qa.QASettings`
  defaults and logs a warning saying so.

Batches and results. The student's 8-bit activation quantizers take their range from the statistics of the
current batch (dynamic per-tensor min/max), padding positions included, so a prediction depends on the other
examples in its batch and on the padded length. To keep results reproducible and equal to the evaluation in
training, examples are batched **in input order** (never sorted by length: that would change the batches and so
the results) and each batch is padded on the right to its longest example only (as the training collate does).
The same input with the same ``batch_size`` gives the same predictions; ``batch_size=1`` makes every prediction
independent of the others (and of the padding).
"""

from __future__ import annotations

import os
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import torch

from ds_kdqat.errors import ConfigError, DataError

#: Task kinds :class:`Predictor` predicts.
PREDICTABLE_KINDS = ("classification", "regression", "image_classification", "qa")
#: ``max_seq_length`` used when the export does not record one and the tokenizer gives no usable limit.
FALLBACK_MAX_SEQ_LENGTH = 512

TextExample = Union[str, Sequence[str]]  # one text, or (text_a, text_b)
ImageInput = Any  # a path (str / os.PathLike) or a PIL.Image.Image
QUESTION_KEYS = ("id", "question", "context")  # a QA example given as a mapping

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """One example's prediction.

    Classification: ``label`` (the class name) and ``probabilities`` (class name -> softmax probability, in
    class-index order, summing to 1). Regression: ``score`` (the model's output). The fields of the other kind
    are None.
    """

    label: Optional[str] = None
    probabilities: Optional[dict[str, float]] = None
    score: Optional[float] = None

    def record(self) -> dict:
        """``{"label": ..., "probabilities": {...}}`` or ``{"score": x}`` (what ``ds-kdqat predict`` writes)."""
        if self.score is not None:
            return {"score": self.score}
        return {"label": self.label, "probabilities": dict(self.probabilities or {})}


@dataclass(frozen=True)
class QAPrediction:
    """One question's answer: ``answer`` is a span of its context, or ``""`` (no answer: SQuAD v2.0, or no
    window had a candidate span); ``score`` is the chosen span's ``start_logit + end_logit``, or for ``""`` the
    no-answer score (the smallest ``start[CLS] + end[CLS]`` over the question's windows)."""

    id: str
    answer: str
    score: float

    def record(self) -> dict:
        """``{"id": ..., "answer": ..., "score": ...}`` (what ``ds-kdqat predict`` writes as JSON Lines)."""
        return {"id": self.id, "answer": self.answer, "score": self.score}


def export_info(model: Any) -> Any:
    """``model.kdqat_export`` (set by :func:`ds_kdqat.load_student`); a ConfigError when the model has none."""
    info = getattr(model, "kdqat_export", None)
    if info is None:
        raise ConfigError("model", "no kdqat_export: load the exported student with ds_kdqat.load_student(path, "
                                   "backend), which records its folder and task")
    return info


class Predictor:
    """Predictions of a loaded exported student (any backend of :func:`ds_kdqat.load_student`).

    ``max_seq_length``: tokens per example (special tokens included); default the export's
    ``task.max_seq_length``, else the tokenizer's ``model_max_length`` (when sensible), else
    :data:`FALLBACK_MAX_SEQ_LENGTH`. A QA export's windows are the export's (``qa_settings``): no override.
    """

    def __init__(self, model: Any, max_seq_length: Optional[int] = None):
        info = export_info(model)
        self.model = model
        self.folder = str(info.folder)
        self.task = dict(info.task)
        self.kind = self.task["kind"]
        if self.kind not in PREDICTABLE_KINDS:
            raise ConfigError("task.kind", f"the export at {self.folder} is a {self.kind!r} model; prediction "
                              f"supports {', '.join(PREDICTABLE_KINDS)}")
        self.labels: list[str] = list(self.task["labels"])
        self.text_fields: list[str] = list(self.task["text_fields"])
        self.qa_settings = None
        if self.kind == "image_classification":
            self.image_format = self._image_format()
            self.tokenizer, self.max_seq_length = None, None
        elif self.kind == "qa":
            if max_seq_length is not None:
                raise ConfigError("max_seq_length", "a QA export's windows are its manifest's (task.max_seq_length, "
                                                    "task.qa); they cannot be overridden")
            self.image_format = None
            self.tokenizer = self._tokenizer()
            self.qa_settings = self._qa_settings()
            self.max_seq_length = self.qa_settings.max_seq_length
        else:
            self.image_format = None
            self.tokenizer = self._tokenizer()
            self.max_seq_length = max_seq_length or self._default_max_seq_length()

    # -- properties -----------------------------------------------------------------------------------------

    @property
    def is_regression(self) -> bool:
        return self.kind == "regression"

    @property
    def is_image(self) -> bool:
        return self.kind == "image_classification"

    @property
    def is_qa(self) -> bool:
        return self.kind == "qa"

    @property
    def is_pair(self) -> bool:
        """Whether a text example is a pair ``(text_a, text_b)`` (the task has two text fields)."""
        return not self.is_image and len(self.text_fields) == 2

    # -- preprocessing --------------------------------------------------------------------------------------

    def _tokenizer(self):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        except (OSError, ValueError) as error:
            raise DataError(self.folder, f"no readable tokenizer in the export ({error}); export the student "
                                         "again with `ds-kdqat export`") from None
        if tokenizer.pad_token_id is None:
            raise DataError(self.folder, "the export's tokenizer has no pad token; batches cannot be padded")
        return tokenizer

    def _qa_settings(self):
        """The export's :class:`~ds_kdqat.data.qa.QASettings` (defaults, with a warning, for unrecorded keys)."""
        from ds_kdqat.deploy.artifact import qa_settings_of

        if not getattr(self.tokenizer, "is_fast", False):
            raise DataError(self.folder, "extractive QA needs a fast tokenizer (character offsets, tokenizer.json); "
                                         "the export's tokenizer is a slow one")
        settings, missing = qa_settings_of(self.task, os.path.join(self.folder, "manifest.json"))
        if missing:
            used = ", ".join(f"{key.rsplit('.', 1)[-1]}={getattr(settings, key.rsplit('.', 1)[-1])}"
                             for key in missing)
            logger.warning("%s: the manifest does not record %s (an export from before QA settings were recorded); "
                           "using the defaults %s", os.path.join(self.folder, "manifest.json"), ", ".join(missing),
                           used)
        return settings

    def _default_max_seq_length(self) -> int:
        recorded = self.task.get("max_seq_length")
        if recorded:
            return int(recorded)
        limit = getattr(self.tokenizer, "model_max_length", None)
        return int(limit) if isinstance(limit, int) and 0 < limit <= 100_000 else FALLBACK_MAX_SEQ_LENGTH

    def _image_format(self):
        from ds_kdqat.data.image_encode import ImageFormat

        config = getattr(self.model, "config", None)
        if config is None or not hasattr(config, "image_size"):
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(self.folder, local_files_only=True)
        try:
            return ImageFormat.for_model(config, self.folder, local_files_only=True)
        except (AttributeError, ValueError) as error:
            raise DataError(self.folder, f"cannot tell the image format of the export: {error}") from None

    def encode(self, batch: Sequence[Any], first_index: int = 0) -> dict[str, torch.Tensor]:
        """The model inputs of ``batch`` (examples as described in the module docstring).

        Text: ``input_ids``, ``attention_mask`` and (when the export's task says the model takes them)
        ``token_type_ids``, each int64 ``(B, T)``, ``T`` = the longest example after truncation, padded on the
        right. Images: ``pixel_values`` float32 ``(B, C, H, W)``. ``first_index`` numbers the examples in errors.
        """
        if not batch:
            raise ValueError("empty batch")
        if self.is_image:
            return self._encode_images(batch, first_index)
        return self._encode_texts(batch, first_index)

    def _texts(self, example: Any, index: int) -> tuple[str, Optional[str]]:
        """``(text_a, text_b)`` of one text example; DataError naming ``example <index>`` when malformed."""
        where = f"example {index}"
        if isinstance(example, str):
            texts = [example]
        elif isinstance(example, Sequence) and all(isinstance(t, str) for t in example):
            texts = list(example)
        else:
            raise DataError(where, f"expected text (a string, or a pair of strings), got {type(example).__name__}")
        if len(texts) != len(self.text_fields):
            wanted = "a pair of texts (text_a, text_b)" if self.is_pair else "one text"
            raise DataError(where, f"task {self.task['name']!r} takes {wanted} per example "
                                   f"({', '.join(self.text_fields)}); got {len(texts)}")
        for field_name, text in zip(self.text_fields, texts):
            if not text.strip():
                raise DataError(where, f"empty text for {field_name!r}")
        return texts[0].strip(), texts[1].strip() if self.is_pair else None

    def _encode_texts(self, batch: Sequence[TextExample], first_index: int) -> dict[str, torch.Tensor]:
        pairs = [self._texts(example, first_index + i) for i, example in enumerate(batch)]
        text_a = [a for a, _ in pairs]
        text_b = [b for _, b in pairs] if self.is_pair else None
        encoded = self.tokenizer(text_a, text_b, truncation=True, max_length=self.max_seq_length, padding="longest",
                                 return_tensors="pt")
        inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        if self.task.get("token_type_ids", True) and "token_type_ids" in encoded:
            inputs["token_type_ids"] = encoded["token_type_ids"]
        return {key: value.long() for key, value in inputs.items()}

    def _encode_images(self, batch: Sequence[ImageInput], first_index: int) -> dict[str, torch.Tensor]:
        import numpy as np

        from ds_kdqat.data.images import ImageExample

        pixels = []
        for i, item in enumerate(batch):
            if isinstance(item, (str, os.PathLike)):
                example = ImageExample("", os.fspath(item), _file_opener(os.fspath(item)))
            elif hasattr(item, "convert") and hasattr(item, "load"):
                example = ImageExample("", f"example {first_index + i}", lambda image=item: image)
            else:
                raise DataError(f"example {first_index + i}", "expected an image file path or a PIL image, got "
                                                              f"{type(item).__name__}")
            pixels.append(self.image_format.pixels(example.open()))
        return {"pixel_values": self.image_format.normalize(torch.from_numpy(np.stack(pixels)))}

    # -- prediction -----------------------------------------------------------------------------------------

    def predict_batch(self, batch: Sequence[Any], first_index: int = 0) -> list[Prediction]:
        """The predictions of one batch, in order (one forward pass over the whole batch)."""
        inputs = self.encode(batch, first_index)
        with torch.no_grad():
            output = self.model(**inputs)
        logits = output.logits if hasattr(output, "logits") else output[0]
        return self.decode(torch.as_tensor(logits), len(batch))

    def decode(self, logits: torch.Tensor, batch_size: int) -> list[Prediction]:
        """Logits ``(B, num_labels)`` (regression: ``(B, 1)`` or ``(B,)``) → one :class:`Prediction` per row."""
        logits = logits.detach().float().cpu()
        if self.is_regression:
            scores = logits.reshape(batch_size, -1)
            if scores.shape[1] != 1:
                raise DataError(self.folder, f"a regression model should output one score, got {scores.shape[1]}")
            return [Prediction(score=float(value)) for value in scores[:, 0]]
        if logits.ndim != 2 or logits.shape != (batch_size, len(self.labels)):
            raise DataError(self.folder, f"the model outputs logits of shape {tuple(logits.shape)}; the export's "
                                         f"task has {len(self.labels)} labels and the batch {batch_size} examples")
        probabilities = torch.softmax(logits.double(), dim=-1)
        best = probabilities.argmax(dim=-1)
        return [Prediction(label=self.labels[int(k)],
                           probabilities={name: float(p) for name, p in zip(self.labels, row)})
                for k, row in zip(best, probabilities)]

    def predict(self, examples: Iterable[Any], batch_size: int = 32) -> Iterator[Any]:
        """One :class:`Prediction` per example, in input order, computed ``batch_size`` examples at a time
        (batches in input order, padded to their longest example: see the module docstring). ``examples`` may
        be any iterable (it is read one batch ahead). QA: one :class:`QAPrediction` per question, ``batch_size``
        windows at a time (:meth:`predict_qa`; every question is read first)."""
        if batch_size < 1:
            raise ConfigError("batch_size", f"expected a positive integer, got {batch_size}")
        if self.is_qa:
            yield from self.predict_qa([qa_example(item, i) for i, item in enumerate(examples)], batch_size)
            return
        batch: list[Any] = []
        done = 0
        for example in examples:
            batch.append(example)
            if len(batch) == batch_size:
                yield from self.predict_batch(batch, done)
                done += len(batch)
                batch = []
        if batch:
            yield from self.predict_batch(batch, done)


    # -- extractive QA --------------------------------------------------------------------------------------

    def _require_qa(self) -> None:
        if not self.is_qa:
            raise ConfigError("task.kind", f"the export at {self.folder} is a {self.kind!r} model, not extractive QA")

    def qa_features(self, examples: Sequence[Any]) -> list:
        """The windows (:class:`~ds_kdqat.data.qa.QAFeature`) of ``examples`` (QAExamples), in example order, cut
        with the export's settings as in training."""
        from ds_kdqat.data.qa import build_features

        self._require_qa()
        if not examples:
            raise DataError("examples", "no questions")
        return build_features(examples, self.tokenizer, self.qa_settings)

    def feature_logits(self, features: Sequence[Any], batch_size: int = 32) -> Iterator[Any]:
        """Each window's start/end logits, float32 numpy ``(len_i, 2)`` (``[:, 0]`` start, ``[:, 1]`` end,
        ``len_i`` its tokens), in feature order. ``batch_size`` windows per forward pass, in order, padded on the
        right to the longest (the training collate, :meth:`ds_kdqat.data.qa.QADataset.collate_fn`), as the
        training evaluation batches them."""
        from ds_kdqat.data.qa import QADataset

        self._require_qa()
        if batch_size < 1:
            raise ConfigError("batch_size", f"expected a positive integer, got {batch_size}")
        dataset = QADataset([], features, self.qa_settings, int(self.tokenizer.pad_token_id),
                            int(getattr(self.tokenizer, "pad_token_type_id", 0) or 0))
        for first in range(0, len(dataset), batch_size):
            batch = dataset.collate_fn([dataset[i] for i in range(first, min(first + batch_size, len(dataset)))])
            yield from self._window_logits(batch)

    def _window_logits(self, batch: dict[str, torch.Tensor]) -> Iterator[Any]:
        """One forward pass over a collated batch of windows → per window its unpadded ``(len_i, 2)`` logits."""
        from ds_kdqat.models.taps import output_logits

        inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "token_type_ids") if key in batch}
        if not self.task.get("token_type_ids", True):
            inputs.pop("token_type_ids", None)
        with torch.no_grad():
            output = self.model(**inputs)
        logits = output_logits(output)
        if logits is None or logits.ndim != 3 or logits.shape[-1] != 2 or logits.shape[:2] != inputs["input_ids"].shape:
            raise DataError(self.folder, "the model does not output start/end logits of shape (batch, tokens); is "
                                         "the export an extractive-QA model?")
        lengths = batch["attention_mask"].sum(-1).tolist()
        for row, n in zip(logits.float().cpu(), lengths):
            yield row[:n].numpy()

    def answers(self, examples: Sequence[Any], features: Sequence[Any], logits: Sequence[Any]) -> list[QAPrediction]:
        """One :class:`QAPrediction` per example (input order) from its windows' ``logits`` (:meth:`feature_logits`
        of ``features``): the answer of :func:`ds_kdqat.data.qa_post.decide_answer`, and its score."""
        from ds_kdqat.data.qa_post import decide_answer, group_windows

        windows = group_windows(len(examples), features, logits)
        return [QAPrediction(example.id, *decide_answer(example.context, own, self.qa_settings))
                for example, own in zip(examples, windows)]

    def predict_qa(self, examples: Sequence[Any], batch_size: int = 32) -> list[QAPrediction]:
        """:meth:`answers` of ``examples`` (QAExamples): windows, batched forward passes, span decoding."""
        features = self.qa_features(examples)
        return self.answers(examples, features, list(self.feature_logits(features, batch_size)))


def qa_example(item: Any, index: int) -> Any:
    """A :class:`~ds_kdqat.data.qa.QAExample` from a QAExample or a mapping with the keys :data:`QUESTION_KEYS`
    (string values, question and context not blank); a DataError names ``example <index>``."""
    from ds_kdqat.data.qa import QAExample

    if isinstance(item, QAExample):
        return item
    where = f"example {index}"
    if not isinstance(item, dict):
        raise DataError(where, f"expected a question {{\"id\", \"question\", \"context\"}}, got {type(item).__name__}")
    for key in QUESTION_KEYS:
        if not isinstance(item.get(key), str):
            found = "missing" if key not in item else f"a {type(item[key]).__name__}"
            raise DataError(where, f"{key!r}: expected a string, {found}")
        if key != "id" and not item[key].strip():
            raise DataError(where, f"empty {key}")
    return QAExample(item["id"], item["question"].strip(), item["context"], ())


def label_field(task: dict) -> str:
    """The label column of the export's task: the manifest's ``label_field`` when recorded, else the registered
    task's (``TASKS[name].label_field``), else ``"label"`` (a described task's default label column)."""
    from ds_kdqat.data.tasks import TASKS

    if task.get("label_field"):
        return str(task["label_field"])
    spec = TASKS.get(task["name"])
    return spec.label_field if spec is not None else "label"


def metric_spec(task: dict):
    """A :class:`~ds_kdqat.data.tasks.TaskSpec` that scores the export's task with
    :func:`ds_kdqat.data.metrics.compute_metrics`: its labels, kind and metrics, ``primary_metric`` first.

    The metric list is the manifest's ``metrics`` when recorded, else the registered task's (same name), else the
    defaults of a described task (:data:`ds_kdqat.data.description.DEFAULT_METRICS`).
    """
    from ds_kdqat.data.description import DEFAULT_METRICS
    from ds_kdqat.data.tasks import TASKS, TaskSpec

    regression = task["kind"] == "regression"
    registered = TASKS.get(task["name"])
    if task.get("metrics"):
        metrics = list(task["metrics"])
    elif registered is not None and registered.is_regression == regression and not registered.is_qa:
        metrics = list(registered.metrics)
    else:
        metrics = list(DEFAULT_METRICS["regression" if regression else "classification"])
    primary = task.get("primary_metric") or metrics[0]
    metrics = [primary, *(name for name in metrics if name != primary)]
    image = task["kind"] == "image_classification"
    return TaskSpec(name=task["name"], text_fields=("image",) if image else tuple(task["text_fields"]),
                    label_field=label_field(task), labels=() if regression else tuple(task["labels"]),
                    is_regression=regression, metrics=tuple(metrics), primary_metric=primary,
                    kind="image_classification" if image else "text")


def task_metrics(task: dict, predictions: Sequence[Prediction], gold: Sequence[Union[str, float]]) -> dict[str, float]:
    """The task's metrics (primary metric first) of ``predictions`` against ``gold``: class names for
    classification (each one of ``task["labels"]``), numbers for regression. Both sequences of length n ≥ 1."""
    import numpy as np

    from ds_kdqat.data.metrics import compute_metrics

    if len(predictions) != len(gold) or not gold:
        raise ValueError(f"{len(predictions)} predictions for {len(gold)} labels (need as many, at least one)")
    spec = metric_spec(task)
    if spec.is_regression:
        return compute_metrics(spec, np.array([p.score for p in predictions], dtype=np.float64),
                               np.array([float(y) for y in gold], dtype=np.float64))
    index = spec.label_index()
    unknown = sorted({str(y) for y in gold if y not in index})
    if unknown:
        raise DataError("labels", f"unknown label(s) {unknown}; the export's classes are {list(spec.labels)}")
    return compute_metrics(spec, np.array([index[p.label] for p in predictions], dtype=np.int64),
                           np.array([index[y] for y in gold], dtype=np.int64))


def _file_opener(path: str):
    def opener():
        from PIL import Image

        if not os.path.isfile(path):
            raise DataError(path, "no such image file")
        return Image.open(path)

    return opener
