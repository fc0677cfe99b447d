"""DataConfig validation and load_split from local folders, augmented train files, the embedded task and the hub."""

import logging

import datasets
import pytest

from ds_kdqat.data import embedded
from ds_kdqat.data.config import DataConfig
from ds_kdqat.data.loading import load_split
from ds_kdqat.errors import ConfigError, DataError


def test_defaults_validate():
    config = DataConfig()
    config.validate()
    assert (config.task, config.source, config.max_seq_length, config.dev_fraction) == ("rt_polarity", "local", 128, 0.1)


@pytest.mark.parametrize(
    "changes, path, fragment",
    [
        ({"task": "glue"}, "kdqat.data.task", "unknown task 'glue'; known tasks: cola, digits, hub_images"),
        ({"source": "web"}, "kdqat.data.source", "'web' is not one of ['local', 'hub']"),
        ({"task": "cola"}, "kdqat.data.data_dir", "required for task 'cola' with source 'local'"),
        ({"data_dir": ""}, "kdqat.data.data_dir", "non-empty path"),
        ({"max_seq_length": 4}, "kdqat.data.max_seq_length", "integer >= 8"),
        ({"max_seq_length": 64.0}, "kdqat.data.max_seq_length", "integer >= 8"),
        ({"on_bad_row": "ignore"}, "kdqat.data.on_bad_row", "'ignore' is not one of ['error', 'skip']"),
        ({"dev_fraction": 1.0}, "kdqat.data.dev_fraction", "number in (0, 1)"),
        ({"dev_fraction": True}, "kdqat.data.dev_fraction", "number in (0, 1)"),
        ({"split_seed": "7"}, "kdqat.data.split_seed", "expected an integer"),
        ({"max_train_examples": 0}, "kdqat.data.max_train_examples", "null or an integer >= 1"),
        ({"max_eval_examples": -3}, "kdqat.data.max_eval_examples", "null or an integer >= 1"),
    ],
)
def test_validate_names_key_path_and_allowed_values(changes, path, fragment):
    with pytest.raises(ConfigError) as err:
        DataConfig(**changes).validate()
    assert err.value.path == path
    assert fragment in str(err.value)


def test_validate_accepts_hub_without_data_dir():
    DataConfig(task="cola", source="hub").validate()


def write_sst2(folder, name, rows):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("sentence\tlabel\n" + "".join(f"{s}\t{lab}\n" for s, lab in rows))
    return folder / name


def test_local_glue_folder_limits_and_train_file(tmp_path):
    write_sst2(tmp_path / "SST-2", "train.tsv", [(f"train {i}", i % 2) for i in range(10)])
    write_sst2(tmp_path / "SST-2", "dev.tsv", [(f"dev {i}", i % 2) for i in range(6)])
    config = DataConfig(task="sst2", data_dir=str(tmp_path / "SST-2"))
    config.validate()
    assert [e.text_a for e in load_split(config, "train")] == [f"train {i}" for i in range(10)]
    config.max_train_examples, config.max_eval_examples = 3, 2
    assert [e.text_a for e in load_split(config, "train")] == ["train 0", "train 1", "train 2"]
    assert [e.text_a for e in load_split(config, "dev")] == ["dev 0", "dev 1"]
    config.train_file = str(write_sst2(tmp_path / "aug", "train_aug.tsv", [("augmented", 1)] * 5))
    assert [e.text_a for e in load_split(config, "train")] == ["augmented"] * 3
    assert [e.text_a for e in load_split(config, "dev")] == ["dev 0", "dev 1"]  # dev untouched


def test_unknown_split_and_missing_file(tmp_path):
    config = DataConfig(task="mnli", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"no split 'dev'; its splits are \['train', 'dev_matched', 'dev_mismatched'\]"):
        load_split(config, "dev")
    with pytest.raises(FileNotFoundError, match="dev_matched.tsv: no such file"):
        load_split(config, "dev_matched")


def test_skip_mode_logs_every_bad_row(tmp_path, caplog):
    path = write_sst2(tmp_path, "train.tsv", [("good", 0), ("bad", 9), ("good too", 1)])
    write_sst2(tmp_path, "dev.tsv", [("x", 0)])
    config = DataConfig(task="sst2", data_dir=str(tmp_path), on_bad_row="skip")
    with caplog.at_level(logging.WARNING, logger="ds_kdqat.data.loading"):
        assert [e.text_a for e in load_split(config, "train")] == ["good", "good too"]
    assert f"skipped bad row {path}:3: unknown label '9'" in caplog.text
    config.on_bad_row = "error"
    with pytest.raises(DataError, match=rf"^{path}:3: unknown label"):
        load_split(config, "train")


def test_embedded_task_is_materialised_under_the_cache(tmp_path, monkeypatch):
    rows = [f'"{lab}","sentence {lab} {i}"\r\n' for lab in ("1", "-1") for i in range(10)]
    csv_path = tmp_path / "rt.csv"
    csv_path.write_text("\ufeff" + "".join(rows), encoding="utf-8")
    monkeypatch.setenv(embedded.ENV_VAR, str(csv_path))
    config = DataConfig(dev_fraction=0.2, split_seed=5)
    train = load_split(config, "train", cache_dir=tmp_path / "cache")
    dev = load_split(config, "dev", cache_dir=tmp_path / "cache")
    assert (len(train), len(dev)) == (16, 4)
    assert (tmp_path / "cache" / "rt_polarity-seed5-dev0.2" / "manifest.json").is_file()


def test_a_users_data_dir_is_read_and_never_written(tmp_path, monkeypatch):
    """rt_polarity with a data_dir reads the user's own split; nothing of theirs is rewritten."""
    rows = [f'"{lab}","sentence {lab} {i}"\r\n' for lab in ("1", "-1") for i in range(10)]
    csv_path = tmp_path / "rt.csv"
    csv_path.write_text("\ufeff" + "".join(rows), encoding="utf-8")
    monkeypatch.setenv(embedded.ENV_VAR, str(csv_path))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "train.tsv").write_text("sentence\tlabel\ngood film\t1\nbad film\t0\ndull plot\t0\n")
    (mine / "dev.tsv").write_text("sentence\tlabel\nfine cast\t1\n")
    before = {p.name: p.read_bytes() for p in mine.iterdir()}
    config = DataConfig(data_dir=str(mine))
    assert [e.text_a for e in load_split(config, "train")] == ["good film", "bad film", "dull plot"]
    assert [e.label for e in load_split(config, "dev")] == ["1"]
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == before
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty/train.tsv: no such file"):
        load_split(DataConfig(data_dir=str(empty)), "train")
    assert list(empty.iterdir()) == []


class FakeHub:
    """Stands in for datasets.load_dataset; records the calls."""

    def __init__(self, dataset):
        self.dataset, self.calls = dataset, []

    def __call__(self, *args, split):
        self.calls.append((args, split))
        return self.dataset


def mnli_hub(labels):
    features = datasets.Features({
        "premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
        "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"]), "idx": datasets.Value("int32"),
    })
    n = len(labels)
    return datasets.Dataset.from_dict(
        {"premise": [f"p{i}" for i in range(n)], "hypothesis": [f"h{i}" for i in range(n)], "label": labels,
         "idx": list(range(n))}, features=features)


def test_hub_mnli_maps_hub_classes_to_raw_labels(monkeypatch):
    fake = FakeHub(mnli_hub([0, 1, 2]))
    monkeypatch.setattr(datasets, "load_dataset", fake)
    examples = load_split(DataConfig(task="mnli", source="hub"), "dev_mismatched")
    assert fake.calls == [(("nyu-mll/glue", "mnli"), "validation_mismatched")]
    assert [(e.text_a, e.text_b, e.label, e.line) for e in examples] == [
        ("p0", "h0", "entailment", 1), ("p1", "h1", "neutral", 2), ("p2", "h2", "contradiction", 3)]
    assert examples[0].row == ["p0", "h0", "0", "0"]


def test_hub_unlabelled_rows(monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", FakeHub(mnli_hub([0, -1, 2])))
    with pytest.raises(DataError) as err:
        load_split(DataConfig(task="mnli", source="hub"), "dev_matched")
    assert err.value.source == "hub:nyu-mll/glue/mnli[validation_matched]:2"
    assert "not a class index in [0, 3)" in str(err.value)
    examples = load_split(DataConfig(task="mnli", source="hub", on_bad_row="skip"), "dev_matched")
    assert [e.label for e in examples] == ["entailment", "contradiction"]


def test_hub_stsb_scores_and_wrong_columns(monkeypatch):
    stsb = datasets.Dataset.from_dict({"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": [4.5, 0.25]})
    monkeypatch.setattr(datasets, "load_dataset", FakeHub(stsb))
    examples = load_split(DataConfig(task="stsb", source="hub"), "train")
    assert [float(e.label) for e in examples] == [4.5, 0.25]
    monkeypatch.setattr(datasets, "load_dataset", FakeHub(stsb.rename_column("sentence2", "other")))
    with pytest.raises(DataError, match=r"^hub:nyu-mll/glue/stsb\[train\]: missing column\(s\) \['sentence2'\]"):
        load_split(DataConfig(task="stsb", source="hub"), "train")


def test_hub_class_names_are_checked(monkeypatch):
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["bad", "good"])})
    ds = datasets.Dataset.from_dict({"sentence": ["x"], "label": [1]}, features=features)
    monkeypatch.setattr(datasets, "load_dataset", FakeHub(ds))
    with pytest.raises(DataError, match="label classes"):
        load_split(DataConfig(task="sst2", source="hub"), "train")


def test_hub_train_file_still_overrides(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", FakeHub(None))
    config = DataConfig(task="sst2", source="hub", train_file=str(write_sst2(tmp_path, "aug.tsv", [("aug", 1)])))
    assert [e.text_a for e in load_split(config, "train")] == ["aug"]
