"""A very long line in a GLUE tsv file (beyond the csv module's default 131072-character field limit) reads as
it is, in training and in augmentation (both read with :func:`read_task_file`); a csv error that remains is
reported with its true cause and its file:line."""

import csv

import pytest

from ds_kdqat.data import glue_format
from ds_kdqat.data.glue_format import read_task_file, write_task_file
from ds_kdqat.data.tasks import get_task
from ds_kdqat.errors import DataError

LONG = 2 * 1024 * 1024  # characters of the long sentence: 2 MB, 16x the csv module's default field limit


def long_sentence() -> str:
    words = "a very long review that goes on and on ".split()
    text = " ".join(words[i % len(words)] for i in range(LONG // 4))
    return text[:LONG].strip()


def write_sst2(tmp_path, middle: str):
    path = tmp_path / "train.tsv"
    path.write_text(f"sentence\tlabel\ngood\t0\n{middle}\t1\nalso good\t0\n", encoding="utf-8")
    return path


@pytest.fixture
def default_csv_limit():
    """Start from the csv module's default limit (as a fresh process has) and restore what was there."""
    before = csv.field_size_limit(131072)
    yield
    csv.field_size_limit(before)


def test_a_2mb_sentence_on_line_3_reads_as_that_sentence(tmp_path, default_csv_limit):
    sentence = long_sentence()
    assert len(sentence) > 131072 * 10
    examples, report = read_task_file(write_sst2(tmp_path, sentence), get_task("sst2"))
    assert [ex.line for ex in examples] == [2, 3, 4]
    assert examples[1].text_a == sentence and examples[1].label == "1"
    assert report.examples == 3 and report.skipped == 0


def test_a_long_line_survives_the_augmentation_round_trip(tmp_path, default_csv_limit):
    sentence = long_sentence()
    examples, report = read_task_file(write_sst2(tmp_path, sentence), get_task("sst2"))
    out = tmp_path / "aug.tsv"
    write_task_file(out, get_task("sst2"), examples, header=report.header)
    again, _ = read_task_file(out, get_task("sst2"))
    assert again[1].text_a == sentence


def test_a_remaining_csv_error_names_its_true_cause_and_file_line(tmp_path, monkeypatch, default_csv_limit):
    monkeypatch.setattr(glue_format, "FIELD_SIZE_LIMIT", 100)
    path = write_sst2(tmp_path, "x" * 150)
    with pytest.raises(DataError) as err:
        read_task_file(path, get_task("sst2"))
    assert err.value.source == f"{path}:3"
    assert "field larger than field limit (100)" in err.value.message
    assert "carriage return" not in err.value.message


def test_a_stray_carriage_return_is_still_reported_as_such(tmp_path):
    path = write_sst2(tmp_path, "a\rb")
    with pytest.raises(DataError) as err:
        read_task_file(path, get_task("sst2"))
    assert str(err.value) == f"{path}:3: stray carriage return inside the line"


def test_the_field_size_limit_fits_a_32_bit_c_long(default_csv_limit):
    assert 10 * LONG < glue_format.FIELD_SIZE_LIMIT <= 2**31 - 1  # Windows' C long is 32-bit
    glue_format.allow_long_fields()
    assert csv.field_size_limit() == glue_format.FIELD_SIZE_LIMIT
