"""The embedded default task: strict CSV parsing, the deterministic stratified split, idempotent materialisation."""

import hashlib
import json
from collections import Counter

import pytest

from ds_kdqat.data import embedded
from ds_kdqat.data.embedded import (
    EmbeddedDataMissing, find_rt_polarity_csv, materialize_rt_polarity, parse_rt_polarity_csv, stratified_split,
)
from ds_kdqat.data.glue_format import read_task_file
from ds_kdqat.data.tasks import get_task
from ds_kdqat.errors import DataError

SYNTHETIC = (
    '\ufeff"1","a ""great"" film . \n"\r\n'   # lines 1-2: doubled quotes, newline inside the quotes
    '"-1","dull\tand\nslow"\r\n'              # lines 3-4: a tab and a newline inside the text
    '"1","fine"\r\n'                          # line 5
)


def write_csv(tmp_path, text, name="polarity-en-pang&lee2.csv"):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


def balanced_csv(tmp_path, n_per_label=10):
    rows = [f'"{label}","sentence {label} number {i} ."\r\n' for label in ("1", "-1") for i in range(n_per_label)]
    return write_csv(tmp_path, "\ufeff" + "".join(rows))


@pytest.fixture
def no_csv_anywhere(tmp_path, monkeypatch):
    monkeypatch.delenv(embedded.ENV_VAR, raising=False)
    monkeypatch.setattr(embedded, "SYSTEM_CORPORA_DIR", tmp_path / "no-system")
    monkeypatch.setattr(embedded, "project_data_cache", lambda: tmp_path / "no-cache")


def test_parse_bom_quotes_and_inner_newlines(tmp_path):
    rows = parse_rt_polarity_csv(write_csv(tmp_path, SYNTHETIC))
    assert [(r.label, r.text, r.line) for r in rows] == [
        ("1", 'a "great" film .', 1),
        ("0", "dull and slow", 3),
        ("1", "fine", 5),
    ]


@pytest.mark.parametrize(
    "bad_row, reason",
    [
        ('"0","neutral"\r\n', "unknown label '0' (allowed: '1', '-1')"),
        ('"1","a","b"\r\n', "expected 2 fields (label, text), found 3"),
        ('"1"," \n "\r\n', "empty text"),
        ('"1","bad"quote"\r\n', "malformed CSV: "),  # the rest is the csv module's own wording
        ("\r\n", "blank line"),
    ],
)
def test_parse_errors_name_the_first_line_of_the_row(tmp_path, bad_row, reason):
    path = write_csv(tmp_path, SYNTHETIC + bad_row + '"1","after"\r\n')
    with pytest.raises(DataError) as err:
        parse_rt_polarity_csv(path)
    assert str(err.value).startswith(f"{path}:6: {reason}")
    assert err.value.source == f"{path}:6"


def test_parse_empty_and_bad_utf8(tmp_path):
    empty = write_csv(tmp_path, "\ufeff", name="empty.csv")
    with pytest.raises(DataError) as err:
        parse_rt_polarity_csv(empty)
    assert str(err.value) == f"{empty}: no rows"
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b'"1","ok"\r\n"1","caf\xe9"\r\n')
    with pytest.raises(DataError, match=rf"^{bad}:2: not valid UTF-8"):
        parse_rt_polarity_csv(bad)


def test_stratified_split_is_deterministic_and_stratified():
    labels = ["1"] * 7 + ["0"] * 3
    texts = [f"s{i}" for i in range(10)]
    train, dev = stratified_split(labels, texts, dev_fraction=0.5, seed=3)
    # per label: round-half-up(7 · 0.5) = 4 and round-half-up(3 · 0.5) = 2 go to dev
    assert Counter(labels[i] for i in dev) == {"1": 4, "0": 2}
    assert sorted(train + dev) == list(range(10))
    # the reference order: within a label, by sha256("<seed>\0<text>"); dev takes the first ones
    key = lambda i: hashlib.sha256(f"3\x00{texts[i]}".encode()).digest()  # noqa: E731
    ones = sorted(range(7), key=key)
    zeros = sorted(range(7, 10), key=key)
    assert dev == sorted(ones[:4] + zeros[:2], key=key)
    assert train == sorted(ones[4:] + zeros[2:], key=key)
    assert stratified_split(labels, texts, 0.5, 3) == (train, dev)
    assert stratified_split(labels, texts, 0.5, 4) != (train, dev)


def test_stratified_split_rejects_bad_fractions():
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        stratified_split(["1", "0"], ["a", "b"], 1.0, 0)
    with pytest.raises(ValueError, match="empty split"):
        stratified_split(["1", "0"], ["a", "b"], 0.1, 0)


def test_materialize_writes_sst2_layout_and_manifest(tmp_path):
    source = balanced_csv(tmp_path)
    out = materialize_rt_polarity(tmp_path / "rt", csv_path=source, dev_fraction=0.2, seed=7)
    spec = get_task("rt_polarity")
    train, report = read_task_file(out / "train.tsv", spec)
    dev, _ = read_task_file(out / "dev.tsv", spec)
    assert report.header == ["sentence", "label"]
    assert len(train) == 16 and len(dev) == 4
    assert Counter(e.label for e in dev) == {"1": 2, "0": 2}
    assert {e.text_a for e in train + dev} == {f"sentence {lab} number {i} ." for lab in ("1", "-1") for i in range(10)}
    assert all(e.label == ("1" if "sentence 1 " in e.text_a else "0") for e in train + dev)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["split_seed"] == 7 and manifest["dev_fraction"] == 0.2
    assert manifest["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert (manifest["train_rows"], manifest["dev_rows"]) == (16, 4)


def test_materialize_normalises_whitespace(tmp_path):
    out = materialize_rt_polarity(tmp_path / "rt", csv_path=write_csv(tmp_path, SYNTHETIC), dev_fraction=0.4, seed=0)
    texts = {e.text_a for split in ("train", "dev") for e in read_task_file(out / f"{split}.tsv", get_task("rt_polarity"))[0]}
    assert texts == {'a "great" film .', "dull and slow", "fine"}


def test_materialize_is_idempotent_and_redoes_on_change(tmp_path, monkeypatch):
    source = balanced_csv(tmp_path)
    out = materialize_rt_polarity(tmp_path / "rt", csv_path=source, dev_fraction=0.2, seed=1)
    first = (out / "train.tsv").read_bytes()

    def fail(path):
        raise AssertionError("parsed again although the split is up to date")

    monkeypatch.setattr(embedded, "parse_rt_polarity_csv", fail)
    materialize_rt_polarity(out, csv_path=source, dev_fraction=0.2, seed=1)  # no work
    monkeypatch.undo()

    materialize_rt_polarity(out, csv_path=source, dev_fraction=0.2, seed=2)  # other seed: redone
    assert json.loads((out / "manifest.json").read_text())["split_seed"] == 2
    assert (out / "train.tsv").read_bytes() != first

    (out / "train.tsv").write_text("sentence\tlabel\ntampered\t1\n")  # damaged file: redone
    materialize_rt_polarity(out, csv_path=source, dev_fraction=0.2, seed=2)
    assert len(read_task_file(out / "train.tsv", get_task("rt_polarity"))[0]) == 16


def test_missing_csv_error_says_how_to_get_it(tmp_path, no_csv_anywhere):
    with pytest.raises(EmbeddedDataMissing) as err:
        materialize_rt_polarity(tmp_path / "rt")
    message = str(err.value)
    assert "scripts/fetch_embedded_data.sh" in message and embedded.ENV_VAR in message and "'sst2'" in message
    assert "hub" in message and str(tmp_path / "no-system") in message


def test_missing_csv_but_split_already_there(tmp_path, no_csv_anywhere):
    out = materialize_rt_polarity(tmp_path / "rt", csv_path=balanced_csv(tmp_path), dev_fraction=0.2, seed=1)
    assert materialize_rt_polarity(out, dev_fraction=0.2, seed=1) == out
    with pytest.raises(EmbeddedDataMissing):
        materialize_rt_polarity(out, dev_fraction=0.3, seed=1)


def test_find_order_env_then_system_then_cache(tmp_path, monkeypatch, no_csv_anywhere):
    cache_copy = tmp_path / "cache" / embedded.PACKAGE_CORPORA_SUBDIR / embedded.RT_POLARITY_FILE
    cache_copy.parent.mkdir(parents=True)
    cache_copy.write_text(SYNTHETIC)
    assert find_rt_polarity_csv(cache_dir=tmp_path / "cache") == cache_copy

    system = tmp_path / "system"
    system.mkdir()
    (system / embedded.RT_POLARITY_FILE).write_text(SYNTHETIC)
    monkeypatch.setattr(embedded, "SYSTEM_CORPORA_DIR", system)
    assert find_rt_polarity_csv(cache_dir=tmp_path / "cache") == system / embedded.RT_POLARITY_FILE

    env_file = write_csv(tmp_path, SYNTHETIC, name="mine.csv")
    monkeypatch.setenv(embedded.ENV_VAR, str(env_file))
    assert find_rt_polarity_csv(cache_dir=tmp_path / "cache") == env_file
    monkeypatch.setenv(embedded.ENV_VAR, str(system))  # a folder holding the file
    assert find_rt_polarity_csv() == system / embedded.RT_POLARITY_FILE
    monkeypatch.setenv(embedded.ENV_VAR, str(tmp_path / "nope.csv"))
    with pytest.raises(EmbeddedDataMissing, match="nope.csv"):
        find_rt_polarity_csv()


def _real_csv():
    try:
        return find_rt_polarity_csv()
    except EmbeddedDataMissing:
        return None


@pytest.mark.integration
def test_real_rt_polarity_csv(tmp_path):
    path = _real_csv()
    if path is None:
        pytest.skip("polarity-en-pang&lee2.csv not found: run scripts/fetch_embedded_data.sh")
    rows = parse_rt_polarity_csv(path)
    assert len(rows) == 4000
    assert Counter(r.label for r in rows) == {"1": 2000, "0": 2000}
    assert all("\t" not in r.text and "\n" not in r.text and r.text == r.text.strip() for r in rows)
    out = materialize_rt_polarity(tmp_path / "rt", csv_path=path)
    spec = get_task("rt_polarity")
    train, _ = read_task_file(out / "train.tsv", spec)
    dev, _ = read_task_file(out / "dev.tsv", spec)
    assert (len(train), len(dev)) == (3600, 400)
    assert Counter(e.label for e in dev) == {"1": 200, "0": 200}
    assert not {e.text_a for e in train} & {e.text_a for e in dev}
