"""A task from a description (``task: "custom"``): files in four formats, labels from the data, bad data, the hub
through a fake loader, the shipped KLUE/NSMC configs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import datasets
import pytest
import torch

from ds_kdqat.config import load_config
from ds_kdqat.data import DataConfig, load_split, read_described_file, task_spec, with_training_labels
from ds_kdqat.data.balance import describe_counts, label_counts
from ds_kdqat.data.files import read_table, write_table
from ds_kdqat.data.metrics import compute_metrics
from ds_kdqat.errors import ConfigError, DataError
from tests.tiny import REPO

ROWS = [
    {"text": "the invoice was charged twice", "label": "billing"},
    {"text": "the app crashes on start", "label": "bug"},
    {"text": "please add a dark mode", "label": "feature"},
    {"text": "how do I export my data?", "label": "question"},
    {"text": "love it, thank you", "label": "praise"},
    {"text": "a refund, please", "label": "billing"},
]


def write_rows(path: Path, rows: list[dict], fmt: str | None = None) -> Path:
    fmt = fmt or path.suffix.lstrip(".")
    columns = list(rows[0])
    write_table(path, fmt, columns, rows)
    return path


def custom(train: Path, dev: Path, **keys) -> DataConfig:
    config = DataConfig(task="custom", train_file=str(train), dev_file=str(dev), **keys)
    config.validate()
    return config


def load_all(config: DataConfig):
    spec = task_spec(config)
    train = load_split(config, "train", spec=spec)
    spec = with_training_labels(spec, train, config.train_file)
    return spec, train, {s: load_split(config, s, spec=spec) for s in spec.eval_splits}


# ------------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("suffix", ["csv", "tsv", "jsonl", "parquet"])
def test_each_format_gives_the_same_examples_and_sorted_classes(tmp_path, suffix):
    train = write_rows(tmp_path / f"train.{suffix}", ROWS)
    dev = write_rows(tmp_path / f"dev.{suffix}", ROWS[:3])
    spec, examples, dev_examples = load_all(custom(train, dev))
    assert spec.labels == ("billing", "bug", "feature", "praise", "question")  # sorted, whatever the row order
    assert [(e.text_a, e.label) for e in examples] == [(r["text"], r["label"]) for r in ROWS]
    assert [e.line for e in examples] == ([2, 3, 4, 5, 6, 7] if suffix in ("csv", "tsv") else [1, 2, 3, 4, 5, 6])
    assert spec.metrics == ("macro_f1", "accuracy") and spec.primary_metric == "macro_f1"
    assert len(dev_examples["dev"]) == 3


def test_format_key_overrides_the_extension_and_csv_quoting(tmp_path):
    (tmp_path / "train.txt").write_text('text,label\n"a, ""quoted"" text\nover two lines",yes\nplain,no\n',
                                        encoding="utf-8")
    config = custom(tmp_path / "train.txt", tmp_path / "train.txt", format="csv")
    spec, train, _ = load_all(config)
    assert train[0].text_a == 'a, "quoted" text\nover two lines' and train[1].line == 4
    assert spec.labels == ("no", "yes")


def test_class_order_is_stable_and_numeric_labels_sort_as_numbers(tmp_path):
    rows = [{"text": f"t{i}", "label": str(v)} for i, v in enumerate([10, 2, 1, 2, 10])]
    first, _, _ = load_all(custom(write_rows(tmp_path / "a.csv", rows), tmp_path / "a.csv"))
    random.Random(0).shuffle(rows)
    second, _, _ = load_all(custom(write_rows(tmp_path / "b.csv", rows), tmp_path / "b.csv"))
    assert first.labels == second.labels == ("1", "2", "10")


def test_explicit_labels_fix_the_order(tmp_path):
    train = write_rows(tmp_path / "t.csv", ROWS)
    spec, _, _ = load_all(custom(train, train, labels=["question", "praise", "feature", "bug", "billing"]))
    assert spec.labels == ("question", "praise", "feature", "bug", "billing") and not spec.labels_from_data


def test_pairs_regression_and_a_dotted_column(tmp_path):
    rows = [{"s1": "a cat", "s2": "a dog", "labels": {"label": 3.2, "binary": 1}},
            {"s1": "rain", "s2": "sun", "labels": {"label": 0.5, "binary": 0}}]
    for fmt in ("jsonl", "parquet"):
        path = write_rows(tmp_path / f"sts.{fmt}", rows)
        config = custom(path, path, text_columns=["s1", "s2"], label_column="labels.label", task_type="regression")
        spec, train, _ = load_all(config)
        assert spec.is_regression and spec.metrics == ("pearson", "spearman")
        assert [(e.text_a, e.text_b, float(e.label)) for e in train] == [("a cat", "a dog", 3.2), ("rain", "sun", 0.5)]


def test_json_integer_and_boolean_labels_become_text(tmp_path):
    rows = [{"text": "x", "label": 1}, {"text": "y", "label": 0}]
    spec, train, _ = load_all(custom(write_rows(tmp_path / "t.jsonl", rows), tmp_path / "t.jsonl"))
    assert spec.labels == ("0", "1") and [e.label for e in train] == ["1", "0"]


# ------------------------------------------------------------------------------------------------ bad data


def _bad(tmp_path: Path, name: str, content: bytes | str, **keys) -> DataError:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    good = write_rows(tmp_path / "good.csv", ROWS)
    train, dev = (good, path) if keys.pop("as_dev", False) else (path, good)
    with pytest.raises(DataError) as caught:
        load_all(custom(train, dev, **keys))
    return caught.value


def test_dev_label_the_training_file_lacks(tmp_path):
    error = _bad(tmp_path, "dev.csv", "text,label\nok,bug\nwhat now,complaint\n", as_dev=True)
    assert error.source == f"{tmp_path / 'dev.csv'}:3" and "'complaint'" in str(error)


def test_missing_column_names_the_columns_there(tmp_path):
    error = _bad(tmp_path, "t.csv", "sentence,label\nhi,bug\n")
    assert error.source.endswith("t.csv:1") and "'text'" in str(error) and "['sentence', 'label']" in str(error)
    error = _bad(tmp_path, "t.jsonl", '{"body": "hi", "label": "x"}\n')
    assert "['body', 'label']" in str(error)


@pytest.mark.parametrize("name,content,line,words", [
    ("empty.csv", "", None, "empty file"),
    ("blank.jsonl", "\n \n", None, "empty file"),
    ("header_only.tsv", "text\tlabel\n", None, "no rows"),
    ("empty_text.csv", "text,label\nfine,bug\n  ,bug\n", 3, "empty text in column 'text'"),
    ("short_row.tsv", "text\tlabel\nfine\tbug\nonly one field\n", 3, "found 1"),
    ("bad_json.jsonl", '{"text": "a", "label": "b"}\n{"text": "a", "label": \n', 2, "malformed JSON"),
    ("latin1.csv", "text,label\nfine,bug\n".encode() + "caf\xe9,bug\n".encode("latin-1"), 3, "not valid UTF-8"),
    ("latin1.jsonl", b'{"text": "a", "label": "b"}\n{"text": "caf\xe9", "label": "b"}\n', 2, "not valid UTF-8"),
    ("no_label.csv", "text,label\nfine,\n", 2, "empty label"),
    ("empty.parquet", b"", None, "empty file"),
    ("broken.parquet", b"PAR1 not really", None, "not a readable Parquet file"),
])
def test_bad_rows_and_files_name_file_and_line(tmp_path, name, content, line, words):
    error = _bad(tmp_path, name, content)
    assert error.source == str(tmp_path / name) + (f":{line}" if line else "")
    assert words in error.message


def test_regression_label_that_is_not_a_number(tmp_path):
    error = _bad(tmp_path, "r.csv", "text,label\na,1.5\nb,high\n", task_type="regression")
    assert error.source.endswith("r.csv:3") and "'high'" in error.message and "not a number" in error.message


def test_a_single_training_class_is_an_error(tmp_path):
    error = _bad(tmp_path, "one.csv", "text,label\na,x\nb,x\n")
    assert "at least two" in error.message


def test_skip_leaves_bad_rows_out_and_counts_them(tmp_path, caplog):
    train = write_rows(tmp_path / "t.csv", ROWS)
    (tmp_path / "dev.csv").write_text("text,label\nok,bug\nwhat,complaint\n,bug\nfine,praise\n", encoding="utf-8")
    with caplog.at_level("WARNING"):
        _, _, dev = load_all(custom(train, tmp_path / "dev.csv", on_bad_row="skip"))
    assert [e.line for e in dev["dev"]] == [2, 5]
    assert "skipped 2 bad rows in all" in caplog.text and "dev.csv:3" in caplog.text


def test_report_counts_rows_and_skips(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "a", "label": "x"}\nnot json\n{"text": "b", "label": "y"}\n', encoding="utf-8")
    spec = task_spec(custom(path, path))
    examples, report = read_described_file(path, spec, on_bad_row="skip")
    assert (report.rows, report.examples, report.skipped) == (3, 2, 1)


# ------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("keys,path", [
    ({"dev_file": None}, "kdqat.data.dev_file"),
    ({"format": "xlsx"}, "kdqat.data.format"),
    ({"train_file": "data/train.txt"}, "kdqat.data.train_file"),
    ({"text_columns": ["a", "b", "c"]}, "kdqat.data.text_columns"),
    ({"text_columns": ["label"]}, "kdqat.data.label_column"),
    ({"task_type": "ranking"}, "kdqat.data.task_type"),
    ({"metrics": ["accuracy", "pearson"]}, "kdqat.data.metrics[1]"),
    ({"primary_metric": "mcc"}, "kdqat.data.primary_metric"),
    ({"labels": ["only"]}, "kdqat.data.labels"),
    ({"task_type": "regression", "labels": ["a", "b"]}, "kdqat.data.labels"),
    ({"hub_config": "x"}, "kdqat.data.hub_config"),
    ({"data_dir": "somewhere"}, "kdqat.data.data_dir"),
])
def test_description_errors_name_their_key(keys, path):
    values = {"task": "custom", "train_file": "t.csv", "dev_file": "d.csv", **keys}
    with pytest.raises(ConfigError) as caught:
        DataConfig(**values).validate()
    assert caught.value.path == path


def test_description_keys_are_refused_for_a_preset():
    with pytest.raises(ConfigError) as caught:
        DataConfig(task="sst2", data_dir="x", text_columns=["a"]).validate()
    assert caught.value.path == "kdqat.data.text_columns"
    with pytest.raises(ConfigError) as caught:
        DataConfig(task="custom", source="hub").validate()
    assert caught.value.path == "kdqat.data.hub_id"


@pytest.mark.parametrize("name,task_type,columns", [
    ("klue_tc", "classification", ["title"]), ("nsmc", "classification", ["document"]),
    ("klue_sts", "regression", ["sentence1", "sentence2"]),
])
def test_shipped_korean_configs_are_valid_descriptions(name, task_type, columns):
    config = load_config(str(REPO / "ds_configs" / f"{name}.json")).kdqat.data
    assert config.task == "custom" and config.source == "hub"
    assert config.task_type == task_type and config.text_columns == columns
    spec = task_spec(config)
    assert spec.is_regression == (task_type == "regression")


# ----------------------------------------------------------------------------------------------------- hub


class FakeHub:
    def __init__(self, splits: dict):
        self.splits, self.calls = splits, []

    def __call__(self, *args, split):
        self.calls.append((args, split))
        return self.splits[split]


def test_hub_description_maps_class_indices_to_names(monkeypatch):
    features = datasets.Features({"title": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["IT", "economy", "sports"])})
    train = datasets.Dataset.from_dict({"title": ["a", "b", "c", "d"], "label": [2, 0, 1, 2]}, features=features)
    dev = datasets.Dataset.from_dict({"title": ["e", "f"], "label": [1, -1]}, features=features)
    fake = FakeHub({"train": train, "validation": dev})
    monkeypatch.setattr(datasets, "load_dataset", fake)
    config = DataConfig(task="custom", source="hub", hub_id="klue", hub_config="ynat", text_columns=["title"],
                        on_bad_row="skip")
    config.validate()
    spec, train_examples, dev_examples = load_all(config)
    assert spec.labels == ("IT", "economy", "sports")
    assert [e.label for e in train_examples] == ["sports", "IT", "economy", "sports"]
    assert [e.label for e in dev_examples["dev"]] == ["economy"]  # the unlabelled row (-1) skipped
    assert fake.calls[0] == (("klue", "ynat"), "train")


def test_hub_description_nested_score_and_missing_column(monkeypatch):
    rows = {"sentence1": ["a", "b"], "sentence2": ["c", "d"],
            "labels": [{"label": 4.5, "binary-label": 1}, {"label": 0.5, "binary-label": 0}]}
    sts = datasets.Dataset.from_dict(rows)
    monkeypatch.setattr(datasets, "load_dataset", FakeHub({"train": sts, "validation": sts}))
    config = DataConfig(task="custom", source="hub", hub_id="klue", hub_config="sts", task_type="regression",
                        text_columns=["sentence1", "sentence2"], label_column="labels.label")
    config.validate()
    _, train, _ = load_all(config)
    assert [float(e.label) for e in train] == [4.5, 0.5]
    config.text_columns = ["sentence1", "sentence3"]
    with pytest.raises(DataError) as caught:
        load_all(config)
    assert caught.value.source == "hub:klue/sts[train]" and "'sentence3'" in str(caught.value)
    assert "sentence1" in caught.value.message  # the columns that exist


# --------------------------------------------------------------------------------- metrics and label counts


def test_macro_and_micro_f1_and_label_counts(tmp_path):
    train = write_rows(tmp_path / "t.csv", ROWS)
    spec, _, _ = load_all(custom(train, train, metrics=["macro_f1", "micro_f1", "accuracy", "mcc"]))
    scores = compute_metrics(spec, [0, 1, 1, 3, 4], [0, 1, 2, 3, 4])
    assert scores["micro_f1"] == pytest.approx(scores["accuracy"]) == pytest.approx(0.8)
    assert scores["macro_f1"] == pytest.approx((1 + 2 / 3 + 0 + 1 + 1) / 5)
    counts = label_counts(torch.tensor([0, 0, 0, 0, 1, 3]), spec)
    assert counts == {"billing": 4, "bug": 1, "feature": 0, "praise": 1, "question": 0}
    line = describe_counts("dev", counts, False)
    assert "no example of ['feature', 'question']" in line and "imbalanced" in line


def test_tables_round_trip(tmp_path):
    for fmt in ("csv", "tsv", "jsonl", "parquet"):
        path = write_rows(tmp_path / f"x.{fmt}", ROWS)
        table = read_table(path, fmt)
        assert table.columns == ["text", "label"] and [r.values for r in table.records] == ROWS
    with pytest.raises(ValueError, match="tab or line break"):
        write_table(tmp_path / "y.tsv", "tsv", ["text"], [{"text": "a\tb"}])
    assert json.loads((tmp_path / "x.jsonl").read_text().splitlines()[0]) == ROWS[0]
