"""Metrics against values worked out by hand."""

import math

import numpy as np
import pytest

from ds_kdqat.data.metrics import (
    accuracy, average_ranks, compute_metrics, f1_score, matthews_corrcoef, pearson, spearman,
)
from ds_kdqat.data.tasks import get_task


def test_accuracy_and_f1():
    pred, gold = [0, 1, 1, 0, 1], [0, 1, 0, 0, 0]
    assert accuracy(pred, gold) == pytest.approx(3 / 5)
    # TP = 1 (index 1), FP = 2 (indices 2, 4), FN = 0: F1 = 2·1 / (2·1 + 2 + 0)
    assert f1_score(pred, gold) == pytest.approx(0.5)
    # class 0 as positive: TP = 2, FP = 0, FN = 2 -> 2·2 / (2·2 + 0 + 2)
    assert f1_score(pred, gold, positive=0) == pytest.approx(4 / 6)
    assert f1_score([0, 0], [0, 0]) == 0.0  # no positive anywhere: defined as 0


def test_mcc_binary_multiclass_and_degenerate():
    # TP = 2, FP = 1, TN = 2, FN = 0: (2·2 − 1·0) / sqrt(3·2·3·2) = 4/6
    assert matthews_corrcoef([1, 1, 0, 0, 1], [1, 0, 0, 0, 1]) == pytest.approx(2 / 3)
    assert matthews_corrcoef([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)
    # 3 classes, s = 6, c = 3, t = p = (2, 2, 2): (3·6 − 12) / sqrt((36 − 12)(36 − 12)) = 0.25
    assert matthews_corrcoef([0, 1, 2, 0, 1, 2], [0, 1, 2, 1, 2, 0]) == pytest.approx(0.25)
    assert matthews_corrcoef([1, 1, 1, 1], [1, 0, 1, 0]) == 0.0  # constant predictions
    assert matthews_corrcoef([0, 0], [0, 0]) == 0.0


def test_pearson_by_hand():
    # dx = (−1.5, −0.5, 0.5, 1.5), dy = (−3, −1, 0, 4): Σdxdy = 11, Σdx² = 5, Σdy² = 26
    assert pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(130))
    assert pearson([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == 0.0
    with pytest.raises(ValueError, match="finite"):
        pearson([1.0, float("nan")], [1.0, 2.0])


def test_average_ranks_with_ties():
    assert average_ranks([10, 20, 20, 30]).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert average_ranks([3, 1, 3, 3, 2]).tolist() == [4.0, 1.0, 4.0, 4.0, 2.0]


def test_spearman_with_ties_by_hand():
    # ranks x = (1, 2.5, 2.5, 4), y = (1, 3, 2, 4): Σdxdy = 4.5, Σdx² = 4.5, Σdy² = 5
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman([1, 2, 3], [1, 10, 100]) == pytest.approx(1.0)
    assert spearman([5, 5, 5], [1, 2, 3]) == 0.0


def test_compute_metrics_per_task():
    assert compute_metrics(get_task("cola"), np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 0, 1])) == {
        "mcc": pytest.approx(2 / 3)}
    mrpc = compute_metrics(get_task("mrpc"), [0, 1, 1, 0, 1], [0, 1, 0, 0, 0])
    assert list(mrpc) == ["f1", "accuracy"] and mrpc == {"f1": pytest.approx(0.5), "accuracy": pytest.approx(0.6)}
    stsb = compute_metrics(get_task("stsb"), np.array([1.0, 2.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0, 4.0]))
    assert stsb["spearman"] == pytest.approx(4.5 / math.sqrt(22.5))
    assert stsb["pearson"] == pytest.approx(pearson([1, 2, 2, 3], [1, 3, 2, 4]))
    assert compute_metrics(get_task("mnli"), [0, 2, 1], [0, 1, 1]) == {"accuracy": pytest.approx(2 / 3)}


def test_compute_metrics_rejects_bad_input():
    with pytest.raises(ValueError, match="class indices"):
        compute_metrics(get_task("sst2"), [0.2, 0.9], [0, 1])
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        compute_metrics(get_task("sst2"), [0, 2], [0, 1])
    with pytest.raises(ValueError, match="equal length"):
        compute_metrics(get_task("sst2"), [0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="no predictions"):
        compute_metrics(get_task("sst2"), [], [])
