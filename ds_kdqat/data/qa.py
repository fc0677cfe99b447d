"""Extractive question answering (SQuAD v1.1 / v2.0 JSON): read the file, cut examples into token windows.

File layout (both versions)::

    {"data": [{"paragraphs": [{"context": "...",
                               "qas": [{"id": "q1", "question": "...", "is_impossible": false,
                                        "answers": [{"text": "...", "answer_start": 17}, ...]}]}]}]}

``is_impossible`` is v2.0's (absent or false in v1.1); an unanswerable question has no answer. Every answer's
``context[answer_start : answer_start + len(text)]`` must be its text. Errors are :class:`DataError` with
source ``file`` (the file's structure) or ``file:<question id>`` (one question).

Features (:func:`encode_qa`): ``[CLS] question [SEP] context window [SEP]`` with the question cut to
``max_query_length`` tokens and the context cut into windows of at most ``max_seq_length`` tokens that
overlap by ``doc_stride`` tokens (the fast tokenizer's ``stride``: HF ``run_qa``'s meaning of
``doc_stride``), one feature per window. A feature's label is ``(start, end)``: the token indices of the
first gold answer, or the [CLS] index twice when the question has no answer or the answer is not wholly
inside the window. Each feature keeps its context character offsets (None for question/special tokens) so
that a predicted token span maps back to the context text (:mod:`ds_kdqat.data.qa_post`).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch.utils.data import Dataset

from ds_kdqat.data.encode import Batch, collate
from ds_kdqat.errors import DataError

Offsets = list[Optional[tuple[int, int]]]


@dataclass(frozen=True)
class QAExample:
    """One question: ``answers`` are ``(text, answer_start)`` pairs (empty when unanswerable)."""

    id: str
    question: str
    context: str
    answers: tuple[tuple[str, int], ...]
    is_impossible: bool = False

    @property
    def answer_texts(self) -> list[str]:
        return [text for text, _ in self.answers]


@dataclass(frozen=True)
class QASettings:
    """How examples become features and predictions: SQuAD ``version`` (1 or 2), the window sizes, the
    longest answer in tokens, the v2.0 no-answer margin and the candidates per window (``n_best_size``)."""

    version: int = 1
    max_seq_length: int = 384
    doc_stride: int = 128
    max_query_length: int = 64
    max_answer_length: int = 30
    null_score_diff_threshold: float = 0.0
    n_best_size: int = 20


def _require(value: Any, kind: type, source: str, what: str) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise DataError(source, f"{what}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def json_key(record: Any, key: str, kind: type, source: str, where: str) -> Any:
    """``record[key]`` of type ``kind``; a DataError naming ``source`` and ``where`` (``where.key``) otherwise."""
    if not isinstance(record, dict):
        raise DataError(source, f"{where}: expected an object, got {type(record).__name__}")
    if key not in record:
        raise DataError(source, f"{where}: missing key {key!r}")
    return _require(record[key], kind, source, f"{where}.{key}")


def parse_squad(data: Any, source: str, version: int = 1) -> list[QAExample]:
    """The questions of a loaded SQuAD JSON object ``data``, in file order (see the module docstring).

    ``version`` 1 refuses unanswerable questions; 2 allows them (``is_impossible: true``, no answers).
    """
    return [_parse_question(qa, qid, context, f"{source}:{qid}", version)
            for qid, qa, context, _ in squad_records(data, source)]


def squad_records(data: Any, source: str) -> Iterator[tuple[str, dict, str, str]]:
    """``(question id, question record, context, where)`` of every question of a loaded SQuAD JSON object, in file
    order, the structure checked (``where`` is the paragraph's place, ``data[0].paragraphs[1]``). A question id seen
    before raises once the caller has read its record, and a file without questions raises at the end."""
    seen: set[str] = set()
    for a, article in enumerate(json_key(data, "data", list, source, "top level")):
        for p, paragraph in enumerate(json_key(article, "paragraphs", list, source, f"data[{a}]")):
            where = f"data[{a}].paragraphs[{p}]"
            context = json_key(paragraph, "context", str, source, where)
            for q, qa in enumerate(json_key(paragraph, "qas", list, source, where)):
                qid = json_key(qa, "id", str, source, f"{where}.qas[{q}]")
                yield qid, qa, context, where
                if qid in seen:
                    raise DataError(f"{source}:{qid}", "duplicate question id")
                seen.add(qid)
    if not seen:
        raise DataError(source, "no questions")


def _parse_question(qa: dict, qid: str, context: str, source: str, version: int) -> QAExample:
    question = json_key(qa, "question", str, source, "question").strip()
    if not question:
        raise DataError(source, "empty question")
    impossible = _require(qa.get("is_impossible", False), bool, source, "is_impossible")
    if impossible and version == 1:
        raise DataError(source, "is_impossible is true, but SQuAD v1.1 (version 1) has no unanswerable questions")
    answers = []
    for i, answer in enumerate(json_key(qa, "answers", list, source, "question")):
        text = json_key(answer, "text", str, source, f"answers[{i}]")
        start = json_key(answer, "answer_start", int, source, f"answers[{i}]")
        if not text or context[start:start + len(text)] != text or start < 0:
            found = context[max(start, 0):max(start, 0) + len(text)]
            raise DataError(source, f"answers[{i}]: answer_start {start} does not point at {text!r} in the "
                                    f"context (found {found!r})")
        answers.append((text, start))
    if impossible and answers:
        raise DataError(source, "is_impossible is true but the question has answers")
    if not impossible and not answers:
        raise DataError(source, "no answers (an unanswerable SQuAD v2.0 question needs is_impossible: true)")
    return QAExample(qid, question, context, tuple(answers), impossible)


def read_squad(path: str | Path, version: int = 1) -> list[QAExample]:
    """The questions of the SQuAD JSON file ``path`` (:func:`parse_squad`); DataError ``path`` when it is no
    JSON."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (a SQuAD-format JSON file)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise DataError(str(path), f"not a JSON file ({error})") from None
    return parse_squad(data, str(path), version)


# ------------------------------------------------------------------------------------------------ features


def truncate_question(question: str, tokenizer: Any, max_query_length: int) -> str:
    """``question`` cut after its ``max_query_length``-th token (character offsets of the fast tokenizer)."""
    encoded = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoded["offset_mapping"]
    return question if len(offsets) <= max_query_length else question[:offsets[max_query_length - 1][1]]


def answer_positions(offsets: Offsets, start_char: int, end_char: int, cls_index: int) -> tuple[int, int]:
    """Token indices ``(start, end)`` of the answer ``context[start_char:end_char]`` in a window whose
    context tokens have character ``offsets`` (None elsewhere); ``(cls_index, cls_index)`` when the answer is
    not wholly inside the window."""
    context = [i for i, span in enumerate(offsets) if span is not None]
    if not context or offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
        return cls_index, cls_index
    start = next(i for i in reversed(context) if offsets[i][0] <= start_char)
    end = next(i for i in context if offsets[i][1] >= end_char)
    return start, end


@dataclass
class QAFeature:
    """One window: token ids, its example's index, context offsets, [CLS] index and label positions."""

    input_ids: list[int]
    token_type_ids: Optional[list[int]]
    example_index: int
    offsets: Offsets
    cls_index: int
    start: int
    end: int


def build_features(examples: Sequence[QAExample], tokenizer: Any, settings: QASettings) -> list[QAFeature]:
    """The windows of every example (see the module docstring), in example order."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("question answering needs a fast tokenizer (character offsets)")
    questions = [truncate_question(ex.question, tokenizer, settings.max_query_length) for ex in examples]
    encoded = tokenizer(questions, [ex.context for ex in examples], truncation="only_second",
                        max_length=settings.max_seq_length, stride=settings.doc_stride,
                        return_overflowing_tokens=True, return_offsets_mapping=True)
    cls_id = getattr(tokenizer, "cls_token_id", None)
    features = []
    for i, ids in enumerate(encoded["input_ids"]):
        example_index = encoded["overflow_to_sample_mapping"][i]
        sequence_ids = encoded.sequence_ids(i)
        offsets = [tuple(span) if seq == 1 else None for span, seq in zip(encoded["offset_mapping"][i], sequence_ids)]
        cls_index = ids.index(cls_id) if cls_id in ids else 0
        example = examples[example_index]
        if example.answers:
            text, start_char = example.answers[0]
            start, end = answer_positions(offsets, start_char, start_char + len(text), cls_index)
        else:
            start = end = cls_index
        types = encoded["token_type_ids"][i] if "token_type_ids" in encoded else None
        features.append(QAFeature(list(ids), None if types is None else list(types), example_index, offsets,
                                  cls_index, start, end))
    return features


class QADataset(Dataset):
    """The features of one split; ``dataset[i]`` is ``input_ids``, ``attention_mask``, ``token_type_ids``
    (when the tokenizer makes them) int64 ``(len_i,)`` and ``labels`` int64 ``(2,)`` = (start, end).

    Keeps the examples and each feature's offsets for post-processing (:meth:`score`); ``collate_fn`` pads
    like :func:`ds_kdqat.data.encode.collate` (``labels`` become (B, 2)).
    """

    def __init__(self, examples: Sequence[QAExample], features: Sequence[QAFeature], settings: QASettings,
                 pad_token_id: int, pad_token_type_id: int = 0):
        self.examples = list(examples)
        self.features = list(features)
        self.settings = settings
        self.pad_token_id = pad_token_id
        self.pad_token_type_id = pad_token_type_id

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> Batch:
        feature = self.features[index]
        ids = torch.tensor(feature.input_ids, dtype=torch.int64)
        item = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if feature.token_type_ids is not None:
            item["token_type_ids"] = torch.tensor(feature.token_type_ids, dtype=torch.int64)
        item["labels"] = torch.tensor([feature.start, feature.end], dtype=torch.int64)
        return item

    @property
    def collate_fn(self) -> Callable[[Sequence[Batch]], Batch]:
        return functools.partial(collate, pad_token_id=self.pad_token_id, pad_token_type_id=self.pad_token_type_id)

    def score(self, feature_logits: Sequence[Any]) -> dict[str, float]:
        """SQuAD EM/F1 of per-feature ``(len_i, 2)`` start/end logits (feature order)."""
        from ds_kdqat.data.qa_post import predict_answers
        from ds_kdqat.data.qa_metrics import squad_em_f1

        predictions = predict_answers(self.examples, self.features, feature_logits, self.settings)
        return squad_em_f1(predictions, {ex.id: ex.answer_texts for ex in self.examples})


def encode_qa(examples: Sequence[QAExample], tokenizer: Any, settings: QASettings) -> QADataset:
    """The :class:`QADataset` of ``examples``."""
    if not examples:
        raise ValueError("no questions to encode")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token before encoding")
    return QADataset(examples, build_features(examples, tokenizer, settings), settings,
                     int(tokenizer.pad_token_id), int(getattr(tokenizer, "pad_token_type_id", 0) or 0))
