"""From start/end logits of the windows of a question to its answer text (SQuAD post-processing).

Per window (:func:`window_spans`): the ``n_best`` highest start logits and end logits are paired; a pair
``(s, e)`` is a candidate when both tokens are context tokens (their offsets are not None), ``e >= s`` and
``e - s + 1 <= max_answer_length``; its score is ``start[s] + end[e]`` and its text
``context[offsets[s][0] : offsets[e][1]]``. Per question (:func:`predict_answer`) the best candidate over
all its windows is the answer. SQuAD v2.0 also compares with the no-answer score, the smallest
``start[cls] + end[cls]`` over the windows: the prediction is ``""`` (no answer) when
``null - best > null_score_diff_threshold`` or when no window has a candidate. v1.1 always answers with
the best span (``""`` only when there is no candidate at all).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ds_kdqat.data.qa import Offsets, QAExample, QAFeature, QASettings


@dataclass(frozen=True)
class Span:
    """A candidate answer: score ``start_logit + end_logit`` and its characters ``[start_char, end_char)``."""

    score: float
    start_char: int
    end_char: int


def window_spans(start_logits: Sequence[float], end_logits: Sequence[float], offsets: Offsets,
                 n_best: int, max_answer_length: int) -> list[Span]:
    """The candidate spans of one window (module docstring), best first."""
    start_logits, end_logits = np.asarray(start_logits, dtype=np.float64), np.asarray(end_logits, dtype=np.float64)
    length = min(len(offsets), len(start_logits))
    starts = np.argsort(-start_logits[:length], kind="stable")[:n_best]
    ends = np.argsort(-end_logits[:length], kind="stable")[:n_best]
    spans = []
    for s in starts:
        for e in ends:
            if offsets[s] is None or offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                continue
            spans.append(Span(float(start_logits[s] + end_logits[e]), offsets[s][0], offsets[e][1]))
    spans.sort(key=lambda span: -span.score)
    return spans


def decide_answer(context: str, windows: Sequence[tuple[np.ndarray, np.ndarray, Offsets, int]],
                  settings: QASettings) -> tuple[str, float]:
    """The answer text of one question from its ``windows`` ``(start_logits, end_logits, offsets, cls_index)`` and
    its score: the best span's ``start + end`` logit, or the no-answer score (the smallest ``start[cls] + end[cls]``
    over the windows) when there is no span or, for SQuAD v2.0, the null rule picks no answer."""
    best, null = None, None
    for start, end, offsets, cls_index in windows:
        spans = window_spans(start, end, offsets, settings.n_best_size, settings.max_answer_length)
        if spans and (best is None or spans[0].score > best.score):
            best = spans[0]
        window_null = float(start[cls_index] + end[cls_index])
        null = window_null if null is None else min(null, window_null)
    if best is None:
        return "", float(null)
    if settings.version == 2 and null - best.score > settings.null_score_diff_threshold:
        return "", float(null)
    return context[best.start_char:best.end_char], float(best.score)


def predict_answer(context: str, windows: Sequence[tuple[np.ndarray, np.ndarray, Offsets, int]],
                   settings: QASettings) -> str:
    """The answer text of one question (:func:`decide_answer` without its score)."""
    return decide_answer(context, windows, settings)[0]


def group_windows(num_examples: int, features: Sequence[QAFeature], feature_logits: Sequence) -> list[list[tuple]]:
    """Per example, its windows ``(start_logits, end_logits, offsets, cls_index)`` in feature order, from
    ``feature_logits[i]`` ((len_i, 2): start, end, as float64) of ``features[i]``."""
    if len(features) != len(feature_logits):
        raise ValueError(f"{len(feature_logits)} logit rows for {len(features)} features")
    windows: list[list] = [[] for _ in range(num_examples)]
    for feature, logits in zip(features, feature_logits):
        logits = np.asarray(logits, dtype=np.float64)
        windows[feature.example_index].append((logits[:, 0], logits[:, 1], feature.offsets, feature.cls_index))
    return windows


def predict_answers(examples: Sequence[QAExample], features: Sequence[QAFeature], feature_logits: Sequence,
                    settings: QASettings) -> dict[str, str]:
    """Question id -> predicted text, from ``feature_logits[i]`` ((len_i, 2): start, end) of ``features[i]``."""
    windows = group_windows(len(examples), features, feature_logits)
    return {ex.id: predict_answer(ex.context, windows[i], settings) for i, ex in enumerate(examples)}
