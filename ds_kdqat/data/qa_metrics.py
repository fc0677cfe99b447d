"""SQuAD exact match and F1, as the official evaluation scripts define them (v1.1 and v2.0).

* normalisation (:func:`normalize_answer`): lower-case, remove punctuation (``string.punctuation``), remove
  the articles ``a``/``an``/``the`` (whole words), collapse whitespace;
* EM of one prediction: 1 when the normalised prediction equals a normalised gold answer;
* F1 of one prediction: token overlap of the whitespace tokens of the normalised strings,
  ``2·P·R / (P + R)`` with ``P = common / |pred|``, ``R = common / |gold|`` (common counts multiset
  overlap); 0 when nothing is common. When either side has no token (v2.0's no-answer ``""``) the F1 is 1 if
  both are empty, else 0;
* per question the maximum over its gold answers; a question without gold answer (v2.0 unanswerable, or all
  answers normalising to ``""``) has the single gold answer ``""``, so only the empty prediction scores;
* the totals are means over the questions, in percent (×100), as the scripts print them.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Mapping, Sequence

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 of the normalised strings (1.0 / 0.0 when either has no token: equal or not)."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = sum((collections.Counter(pred_tokens) & collections.Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def gold_answers(answers: Sequence[str]) -> list[str]:
    """The answers that count: those not normalising to ``""``; ``[""]`` when none (no answer)."""
    kept = [a for a in answers if normalize_answer(a)]
    return kept or [""]


def squad_em_f1(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """EM and F1 (percent) of ``predictions`` (question id -> text; ``""`` = no answer) against
    ``references`` (question id -> gold answer texts; empty for an unanswerable v2.0 question).

    Returns ``exact_match``, ``f1`` and ``questions`` (their number; the scripts' ``total``, renamed so as not to
    clash with the loss column ``total`` of log.csv); when some question has no answer (v2.0) also
    ``HasAns_exact_match``/``HasAns_f1``/``HasAns_questions`` and ``NoAns_…`` over the two groups (a group
    without questions is left out). A question without prediction is an error (the scripts count it as 0 and
    warn; here a missing prediction is a bug of the caller).
    """
    if not references:
        raise ValueError("no questions to score")
    missing = [qid for qid in references if qid not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} questions have no prediction, e.g. {missing[0]!r}")
    scores: dict[str, tuple[float, float, bool]] = {}
    for qid, answers in references.items():
        golds = gold_answers(answers)
        prediction = predictions[qid]
        em = max(exact_match(prediction, g) for g in golds)
        f1 = max(token_f1(prediction, g) for g in golds)
        scores[qid] = (em, f1, golds != [""])
    result = _means(scores.values(), "")
    if any(not has for _, _, has in scores.values()):
        for prefix, has_answer in (("HasAns_", True), ("NoAns_", False)):
            group = [s for s in scores.values() if s[2] == has_answer]
            if group:
                result.update(_means(group, prefix))
    return result


def _means(scores, prefix: str) -> dict[str, float]:
    scores = list(scores)
    n = len(scores)
    return {f"{prefix}exact_match": 100.0 * sum(s[0] for s in scores) / n,
            f"{prefix}f1": 100.0 * sum(s[1] for s in scores) / n,
            f"{prefix}questions": float(n)}
