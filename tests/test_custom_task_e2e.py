"""End to end through run/train.py: a described task from CSV files (five string classes, and a regression),
and bad data stopping the run with exit status 2 and ``file:line`` before anything is complete.

The tiny BERT runs in the default suite; the same tasks on the packaged MiniLM are ``integration`` tests."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest

from tests.tiny import make_tiny_bert, run_train, write_config

CLASSES = {
    "billing": ["invoice", "refund", "charged", "payment", "price"],
    "bug": ["crash", "error", "broken", "freezes", "fails"],
    "feature": ["add", "wish", "support", "option", "request"],
    "praise": ["love", "great", "thanks", "awesome", "excellent"],
    "question": ["how", "why", "where", "when", "what"],
}
FILLER = ["the", "app", "my", "account", "today", "please", "it", "this", "again", "team"]
CUSTOM_DATA = {"task": "custom", "text_columns": ["text"], "label_column": "label", "max_seq_length": 16}


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def five_class_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    names = sorted(CLASSES)
    rows = []
    for i in range(n):
        label = names[i % len(names)]
        words = rng.sample(FILLER, 3) + rng.sample(CLASSES[label], 2)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    rng.shuffle(rows)
    return rows


def score_rows(n: int, seed: int) -> list[dict]:
    """A score in [0, 5]: the number of praise words among five words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randint(0, 5)
        words = rng.sample(CLASSES["praise"], k) + rng.sample(FILLER, 5 - k)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "score": f"{k:.1f}"})
    return rows


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def _five_class_run(tmp_path: Path, teacher: str, **kdqat) -> tuple[Path, dict]:
    train = write_csv(tmp_path / "train.csv", five_class_rows(100, 0))
    dev = write_csv(tmp_path / "dev.csv", five_class_rows(40, 1))
    data = {**CUSTOM_DATA, "train_file": str(train), "dev_file": str(dev)}
    config = write_config(tmp_path / "c.json", Path(teacher), tmp_path, tmp_path / "out", data=data, **kdqat)
    run_train(config)
    return tmp_path / "out", json.loads((tmp_path / "out" / "results.json").read_text())


def _check_five_class_outputs(out: Path, results: dict, dev_csv: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    names = sorted(CLASSES)
    assert results["task"] == "custom" and results["primary_metric"] == "macro_f1"
    assert set(results["student"]) == {"macro_f1", "accuracy"}
    assert results["label_counts"]["train"] == {name: 20 for name in names}
    assert results["label_counts"]["dev"] == {name: 8 for name in names}
    for folder in ("teacher", "student"):
        saved = json.loads((out / folder / "config.json").read_text())
        assert saved["id2label"] == {str(i): name for i, name in enumerate(names)}
        assert saved["label2id"] == {name: i for i, name in enumerate(names)}
    # Predictions come back as the user's label strings through the saved mapping.
    model = AutoModelForSequenceClassification.from_pretrained(out / "teacher").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "teacher")
    rows = list(csv.DictReader(open(dev_csv, encoding="utf-8")))
    with torch.no_grad():
        logits = model(**tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")).logits
    predicted = [model.config.id2label[int(i)] for i in logits.argmax(-1)]
    assert set(predicted) <= set(names)
    accuracy = sum(p == r["label"] for p, r in zip(predicted, rows)) / len(rows)
    assert accuracy == pytest.approx(results["teacher"]["accuracy"], abs=1e-6)


def test_five_string_classes_from_csv_on_the_tiny_bert(tiny_model, tmp_path):
    out, results = _five_class_run(tmp_path, str(tiny_model), finetune={"epochs": 6, "learning_rate": 3e-3},
                                   train={"epochs": 2, "learning_rate": 5e-4})
    _check_five_class_outputs(out, results, tmp_path / "dev.csv")
    assert results["teacher"]["accuracy"] > 0.4  # the keywords are learnable: chance is 0.2


def _regression_run(tmp_path: Path, teacher: str, **kdqat) -> dict:
    train = write_csv(tmp_path / "train.csv", score_rows(100, 0))
    dev = write_csv(tmp_path / "dev.csv", score_rows(40, 1))
    data = {**CUSTOM_DATA, "train_file": str(train), "dev_file": str(dev), "label_column": "score",
            "task_type": "regression"}
    config = write_config(tmp_path / "c.json", Path(teacher), tmp_path, tmp_path / "out", data=data, **kdqat)
    run_train(config)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["primary_metric"] == "pearson" and set(results["student"]) == {"pearson", "spearman"}
    assert results["label_counts"]["train"]["n"] == 100 and 0 <= results["label_counts"]["train"]["min"]
    return results


def test_regression_from_csv_on_the_tiny_bert(tiny_model, tmp_path):
    results = _regression_run(tmp_path, str(tiny_model), finetune={"epochs": 6, "learning_rate": 3e-3},
                              train={"epochs": 2, "learning_rate": 5e-4})
    assert results["teacher"]["pearson"] > 0.3


@pytest.mark.integration
def test_five_string_classes_from_csv_on_the_packaged_minilm(tmp_path):
    out, results = _five_class_run(tmp_path, "embedded:all-minilm-l6-v2", finetune={"epochs": 3, "learning_rate": 1e-4},
                                   train={"epochs": 1, "learning_rate": 5e-5})
    _check_five_class_outputs(out, results, tmp_path / "dev.csv")
    assert results["teacher"]["accuracy"] > 0.6


@pytest.mark.integration
def test_regression_from_csv_on_the_packaged_minilm(tmp_path):
    results = _regression_run(tmp_path, "embedded:all-minilm-l6-v2", finetune={"epochs": 3, "learning_rate": 1e-4},
                              train={"epochs": 1, "learning_rate": 5e-5})
    assert results["teacher"]["pearson"] > 0.5


# ------------------------------------------------------------------------------------------------ bad data

GOOD = "text,label\ncrash on start,bug\nrefund please,billing\nlove it,praise\n"
BAD_CASES = {
    # case: (train file name, train content, dev content, extra data keys, expected file:line suffix, words)
    "dev label unseen": ("train.csv", GOOD, "text,label\nerror again,bug\nso slow,complaint\n", {}, "dev.csv:3",
                         "'complaint'"),
    "missing column": ("train.csv", "body,label\nx,bug\n", GOOD, {}, "train.csv:1", "['body', 'label']"),
    "empty file": ("train.csv", "", GOOD, {}, "train.csv", "empty file"),
    "empty text": ("train.csv", GOOD + " ,bug\n", GOOD, {}, "train.csv:5", "empty text"),
    "regression non-number": ("train.csv", "text,label\na,1.5\nb,lots\n", "text,label\nc,2\n",
                              {"task_type": "regression"}, "train.csv:3", "'lots'"),
    "not utf-8": ("train.csv", GOOD.encode() + "caf\xe9 crash,bug\n".encode("latin-1"), GOOD, {}, "train.csv:5",
                  "UTF-8"),
    "malformed json": ("train.jsonl", '{"text": "a", "label": "bug"}\n{"text": "b", "label"\n', GOOD, {},
                       "train.jsonl:2", "malformed JSON"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_data_exits_2_naming_file_and_line(tiny_model, tmp_path, case):
    name, train_content, dev_content, keys, where, words = BAD_CASES[case]
    train = tmp_path / name
    train.write_bytes(train_content if isinstance(train_content, bytes) else train_content.encode("utf-8"))
    (tmp_path / "dev.csv").write_text(dev_content, encoding="utf-8")
    data = {**CUSTOM_DATA, "train_file": str(train), "dev_file": str(tmp_path / "dev.csv"), **keys}
    config = write_config(tmp_path / "c.json", tiny_model, tmp_path, tmp_path / "out", data=data)
    result = run_train(config, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"{tmp_path / where}" in result.stderr and words in result.stderr
    assert not (tmp_path / "out" / "results.json").exists()
    assert not (tmp_path / "out" / "teacher").exists() and not (tmp_path / "out" / "student").exists()


def test_skipped_bad_rows_are_counted_in_the_log(tiny_model, tmp_path):
    """on_bad_row: skip — the dev row with an unseen label is left out, the count is logged, the run completes."""
    train = write_csv(tmp_path / "train.csv", five_class_rows(30, 0))
    dev_rows = five_class_rows(10, 1) + [{"text": "so slow today", "label": "complaint"}]
    dev = write_csv(tmp_path / "dev.csv", dev_rows)
    data = {**CUSTOM_DATA, "train_file": str(train), "dev_file": str(dev), "on_bad_row": "skip"}
    config = write_config(tmp_path / "c.json", tiny_model, tmp_path, tmp_path / "out", data=data,
                          finetune={"epochs": 1, "learning_rate": 1e-3}, train={"epochs": 1, "learning_rate": 1e-4})
    result = run_train(config)
    assert "skipped 1 bad rows in all" in result.stderr + result.stdout
    assert "ds-kdqat: labels of dev: 10 examples" in result.stdout
    assert f"{dev}:12" in result.stderr + result.stdout
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert sum(results["label_counts"]["dev"].values()) == 10
