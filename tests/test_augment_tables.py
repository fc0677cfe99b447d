"""Augmenting a described task's train file (task custom): CSV, TSV and JSON Lines in, the same format out."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from augment.job import manifest_path, run_shard
from ds_kdqat.commands.augment import add_arguments, config_from_args
from ds_kdqat.data import DataConfig, load_split
from ds_kdqat.data.files import write_table
from ds_kdqat.errors import ConfigError, DataError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_augment_common import tiny_mlm_dir, write_glove_text  # noqa: E402
from test_augment_job import SST_ROWS, config  # noqa: E402

LABELS = ["bug", "praise", "billing"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("aug_tables_assets")
    return {"mlm": str(tiny_mlm_dir(d / "mlm")), "glove": str(write_glove_text(d / "glove.test.txt"))}


def write_input(path: Path, fmt: str) -> Path:
    rows = [{"id": i, "body": text, "topic": LABELS[i % 3]} for i, text in enumerate(SST_ROWS)]
    write_table(path, fmt, ["id", "body", "topic"], rows)
    return path


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_custom_file_is_augmented_in_its_own_format(assets, tmp_path, fmt):
    inp = write_input(tmp_path / f"train.{fmt}", fmt)
    out = tmp_path / f"train_aug.{fmt}"
    cfg = config(assets, inp, out, task="custom", text_columns=["body"], label_column="topic", num_new=3)
    result = run_shard(cfg)
    assert result.merged == out
    data = DataConfig(task="custom", train_file=str(out), dev_file=str(inp), text_columns=["body"],
                      label_column="topic")
    data.validate()
    rows = load_split(data, "train")
    ids = [int(row.record["id"]) for row in rows]  # other columns copied unchanged
    assert ids == sorted(ids) and set(ids) == set(range(len(SST_ROWS)))
    firsts = [ids.index(i) for i in range(len(SST_ROWS))]
    assert [rows[j].text_a for j in firsts] == [s.strip() for s in SST_ROWS]  # each original, then its new rows
    assert len(rows) > len(SST_ROWS)
    assert all(row.label == LABELS[i % 3] for row, i in zip(rows, ids))
    manifest = json.loads(manifest_path(out).read_text())
    assert manifest["counts"]["output_rows"] == len(rows)


def test_custom_augment_errors(assets, tmp_path):
    inp = write_input(tmp_path / "train.csv", "csv")
    with pytest.raises(DataError, match=r"no text column 'text'.*\['id', 'body', 'topic'\]"):
        run_shard(config(assets, inp, tmp_path / "o.csv", task="custom", label_column="topic"))
    with pytest.raises(ConfigError) as caught:
        run_shard(config(assets, inp, tmp_path / "o.jsonl", task="custom", text_columns=["body"],
                         label_column="topic"))
    assert caught.value.path == "augment.output"
    with pytest.raises(ConfigError) as caught:
        run_shard(config(assets, inp, tmp_path / "o.tsv", text_columns=["body"]))
    assert caught.value.path == "augment.text_columns"


def test_column_options_imply_task_custom():
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--input", "x.csv", "--text_column", "q", "--text_column", "a",
                                              "--label_column", "y", "--N", "2"]))
    assert (cfg.task, cfg.text_columns, cfg.label_column) == ("custom", ["q", "a"], "y")
    assert config_from_args(parser.parse_args([])).task == "rt_polarity"
