"""GLUE tsv reader/writer: every task's layout, every bad-file error with its file:line, skip mode, round trip."""

import dataclasses

import pytest

from ds_kdqat.data.glue_format import Example, read_task_file, write_task_file
from ds_kdqat.data.tasks import get_task
from ds_kdqat.errors import DataError

MNLI_TRAIN_HEADER = (
    "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
    "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label"
)
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER.replace("label1\t", "label1\tlabel2\tlabel3\tlabel4\tlabel5\t")


def write(tmp_path, name, lines, *, ending="\n", bom=False):
    path = tmp_path / name
    text = ending.join(lines) + (ending if lines else "")
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def test_cola_without_header(tmp_path):
    path = write(tmp_path, "train.tsv", [
        "gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.",
        "gj04\t0\t*\tThey drank the pub \"dry\".",
    ])
    examples, report = read_task_file(path, get_task("cola"))
    assert [(e.text_a, e.label, e.line) for e in examples] == [
        ("Our friends won't buy this analysis, let alone the next one we propose.", "1", 1),
        ('They drank the pub "dry".', "0", 2),  # stray quotes stay ordinary characters
    ]
    assert examples[1].row == ["gj04", "0", "*", 'They drank the pub "dry".']
    assert examples[0].text_b is None
    assert report.header is None and report.rows == 2 and report.examples == 2 and report.skipped == 0


def test_sst2_with_bom_and_crlf(tmp_path):
    path = write(tmp_path, "dev.tsv", ["sentence\tlabel", "it 's a charming journey . \t1", "dull\t0"],
                 ending="\r\n", bom=True)
    examples, report = read_task_file(path, get_task("sst2"))
    assert report.header == ["sentence", "label"]
    assert [(e.text_a, e.label, e.line) for e in examples] == [("it 's a charming journey .", "1", 2), ("dull", "0", 3)]


def test_mnli_train_and_two_dev_files(tmp_path):
    spec = get_task("mnli")
    train = write(tmp_path, "train.tsv", [
        MNLI_TRAIN_HEADER,
        "0\t31193\t31193n\tgovernment\t( ( A ) )\t( B )\t(ROOT A)\t(ROOT B)\tA premise.\tA hypothesis.\tneutral\tneutral",
    ])
    row = "\t".join(["9", "63735", "63735n", "fiction", "(A)", "(B)", "(ROOT A)", "(ROOT B)", "The new rights.",
                     "Everyone loves it.", "neutral", "entailment", "neutral", "neutral", "neutral", "neutral"])
    matched = write(tmp_path, "dev_matched.tsv", [MNLI_DEV_HEADER, row])
    mismatched = write(tmp_path, "dev_mismatched.tsv", [MNLI_DEV_HEADER, row.rsplit("\t", 1)[0] + "\tcontradiction"])
    (ex,), report = read_task_file(train, spec)
    assert (ex.text_a, ex.text_b, ex.label, ex.line) == ("A premise.", "A hypothesis.", "neutral", 2)
    assert len(report.columns) == 12
    (ex,), report = read_task_file(matched, spec)
    assert (ex.text_a, ex.text_b, ex.label) == ("The new rights.", "Everyone loves it.", "neutral")
    assert len(report.columns) == 16 and len(ex.row) == 16
    (ex,), _ = read_task_file(mismatched, spec)
    assert ex.label == "contradiction"


def test_stsb_float_scores(tmp_path):
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    path = write(tmp_path, "dev.tsv", [
        header,
        "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man with a hard hat is dancing.\tA man wearing a hard hat is dancing.\t5.000",
        "1\tmain-captions\tMSRvid\t2012test\t0002\tnone\tnone\tA young child is riding a horse.\tA child is riding a horse.\t4.750",
    ])
    examples, _ = read_task_file(path, get_task("stsb"))
    assert [e.label for e in examples] == ["5.000", "4.750"]
    assert float(examples[1].label) == 4.75
    assert examples[0].text_b == "A man wearing a hard hat is dancing."


@pytest.mark.parametrize(
    "task, header, row, expected",
    [
        ("mrpc", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String", "1\t702876\t702977\tAmrozi accused .\tReferring to him .",
         ("Amrozi accused .", "Referring to him .", "1")),
        ("qqp", "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", "402555\t536040\t536041\tHow do I X?\tHow to X?\t1",
         ("How do I X?", "How to X?", "1")),
        ("qnli", "index\tquestion\tsentence\tlabel", "0\tWhat came first?\tThe egg.\tnot_entailment",
         ("What came first?", "The egg.", "not_entailment")),
        ("rte", "index\tsentence1\tsentence2\tlabel", "0\tDana Reeve died.\tChristopher Reeve had an accident.\tnot_entailment",
         ("Dana Reeve died.", "Christopher Reeve had an accident.", "not_entailment")),
        ("wnli", "index\tsentence1\tsentence2\tlabel", "0\tI stuck a pin through a carrot.\tThe carrot had a hole.\t1",
         ("I stuck a pin through a carrot.", "The carrot had a hole.", "1")),
        ("rt_polarity", "sentence\tlabel", "a gorgeous film .\t1", ("a gorgeous film .", None, "1")),
    ],
)
def test_pair_and_single_tasks(tmp_path, task, header, row, expected):
    path = write(tmp_path, "dev.tsv", [header, row])
    (ex,), _ = read_task_file(path, get_task(task))
    assert (ex.text_a, ex.text_b, ex.label) == expected


SST2_BAD = [
    # (data line, reason) — each is line 3, after the header and one good row
    ("only-one-column", "expected 2 tab-separated columns, found 1"),
    ("a\t1\textra", "expected 2 tab-separated columns, found 3"),
    ("   \t1", "empty text in column 'sentence'"),
    ("fine\t2", "unknown label '2' in column 'label' (allowed: ['0', '1'])"),
    ("", "blank line"),
    ("a\rb\t1", "stray carriage return inside the line"),
]


@pytest.mark.parametrize("line, reason", SST2_BAD)
def test_bad_rows_name_file_and_line(tmp_path, line, reason):
    path = write(tmp_path, "train.tsv", ["sentence\tlabel", "good\t0", line, "also good\t1"])
    with pytest.raises(DataError) as err:
        read_task_file(path, get_task("sst2"))
    assert str(err.value) == f"{path}:3: {reason}"
    assert err.value.source == f"{path}:3"


def test_bad_utf8_names_line(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_bytes(b"sentence\tlabel\ngood\t0\nbad \xff byte\t1\n")
    with pytest.raises(DataError, match=rf"^{path}:3: not valid UTF-8"):
        read_task_file(path, get_task("sst2"))


def test_stsb_non_numeric_score(tmp_path):
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    path = write(tmp_path, "dev.tsv", [header, "0\tg\tf\ty\to\tn\tn\tA.\tB.\t4.0", "1\tg\tf\ty\to\tn\tn\tA.\tB.\thigh",
                                       "2\tg\tf\ty\to\tn\tn\tA.\tB.\tnan"])
    with pytest.raises(DataError) as err:
        read_task_file(path, get_task("stsb"))
    assert str(err.value) == f"{path}:3: score 'high' is not a number"
    examples, report = read_task_file(path, get_task("stsb"), on_bad_row="skip")
    assert [str(b) for b in report.bad_rows] == [f"{path}:3: score 'high' is not a number",
                                                 f"{path}:4: score 'nan' is not a finite number"]


def test_header_missing_column(tmp_path):
    path = write(tmp_path, "dev.tsv", ["index\tquestion\ttext\tlabel", "0\tq\ts\tentailment"])
    with pytest.raises(DataError) as err:
        read_task_file(path, get_task("qnli"))
    assert str(err.value).startswith(f"{path}:1: header lacks column(s) ['sentence'] of task 'qnli'")


def test_empty_file_and_header_only(tmp_path):
    empty = write(tmp_path, "empty.tsv", [])
    with pytest.raises(DataError) as err:
        read_task_file(empty, get_task("sst2"))
    assert err.value.source == str(empty) and "empty file" in str(err.value)
    header_only = write(tmp_path, "header.tsv", ["sentence\tlabel"])
    with pytest.raises(DataError) as err:
        read_task_file(header_only, get_task("sst2"))
    assert str(err.value) == f"{header_only}: no rows after the header"


def test_skip_mode_counts_and_reports_each_row(tmp_path):
    path = write(tmp_path, "train.tsv", ["sentence\tlabel", "good\t0", "bad\t7", "x\ty\tz", "fine\t1", "\t0"])
    examples, report = read_task_file(path, get_task("sst2"), on_bad_row="skip")
    assert [(e.text_a, e.line) for e in examples] == [("good", 2), ("fine", 5)]
    assert report.rows == 5 and report.examples == 2 and report.skipped == 3
    assert [b.source for b in report.bad_rows] == [f"{path}:3", f"{path}:4", f"{path}:6"]
    assert report.bad_rows[0].reason.startswith("unknown label '7'")
    assert report.summary() == f"{path}: 2 examples from 5 rows, 3 bad rows skipped"


def test_skip_mode_with_no_usable_rows_is_an_error(tmp_path):
    path = write(tmp_path, "train.tsv", ["sentence\tlabel", "bad\t7"])
    with pytest.raises(DataError) as err:
        read_task_file(path, get_task("sst2"), on_bad_row="skip")
    assert err.value.source == str(path) and "no usable rows: all 1 rows are bad" in str(err.value)


def test_unknown_on_bad_row_value(tmp_path):
    path = write(tmp_path, "train.tsv", ["sentence\tlabel", "good\t0"])
    with pytest.raises(ValueError, match="on_bad_row"):
        read_task_file(path, get_task("sst2"), on_bad_row="ignore")


def test_round_trip_mnli_keeps_other_columns(tmp_path):
    spec = get_task("mnli")
    rows = [MNLI_TRAIN_HEADER,
            "0\t1\t1n\tfiction\t(a)\t(b)\t(ROOT a)\t(ROOT b)\tA premise.\tA hypothesis.\tneutral\tneutral",
            "1\t2\t2e\ttravel\t(c)\t(d)\t(ROOT c)\t(ROOT d)\tAnother \"one\".\tSecond.\tentailment\tentailment"]
    src = write(tmp_path, "train.tsv", rows)
    examples, report = read_task_file(src, spec)
    dst = tmp_path / "aug" / "train.tsv"
    changed = [dataclasses.replace(examples[0], text_a="A changed premise.")] + examples
    assert write_task_file(dst, spec, changed, header=report.header) == 3
    lines = dst.read_text(encoding="utf-8").splitlines()
    assert lines[0] == MNLI_TRAIN_HEADER
    assert lines[1] == rows[1].replace("A premise.", "A changed premise.")
    assert lines[2:] == rows[1:]
    again, _ = read_task_file(dst, spec)
    assert [(e.text_a, e.text_b, e.label) for e in again] == [(e.text_a, e.text_b, e.label) for e in changed]
    assert not list(dst.parent.glob(".*tmp"))  # no temporary file left behind


def test_write_cola_headerless_and_plain_rows(tmp_path):
    spec = get_task("cola")
    dst = tmp_path / "train.tsv"
    write_task_file(dst, spec, [["src", "1", "", "A fine sentence."],
                                Example("Other one.", None, "0", 7, ["src", "1", "*", "Old."])])
    assert dst.read_text() == "src\t1\t\tA fine sentence.\nsrc\t0\t*\tOther one.\n"
    with pytest.raises(ValueError, match="no header"):
        write_task_file(dst, spec, [["src", "1", "", "x"]], header=["a", "b", "c", "d"])


def test_write_rejects_what_the_layout_cannot_carry(tmp_path):
    spec = get_task("sst2")
    dst = tmp_path / "train.tsv"
    with pytest.raises(ValueError, match="pass header="):
        write_task_file(dst, spec, [["a", "1"]])
    with pytest.raises(ValueError, match="tab or line break"):
        write_task_file(dst, spec, [Example("a\tb", None, "1", 2, ["x", "1"])], header=["sentence", "label"])
    with pytest.raises(ValueError, match="row 1 has 3 fields"):
        write_task_file(dst, spec, [["a", "1", "x"]], header=["sentence", "label"])
    with pytest.raises(ValueError, match="unknown label '5'"):
        write_task_file(dst, spec, [Example("a", None, "5", 2, ["x", "1"])], header=["sentence", "label"])
    with pytest.raises(ValueError, match="nothing to write"):
        write_task_file(dst, spec, [], header=["sentence", "label"])
    assert not dst.exists()


def test_unchanged_examples_are_written_back_byte_identical(tmp_path):
    spec = get_task("sst2")
    text = "sentence\tlabel\nhide new secretions from the parental units \t0\ncontains no wit , only labored gags \t0\n"
    src = tmp_path / "train.tsv"
    src.write_text(text)
    examples, report = read_task_file(src, spec)
    assert examples[0].text_a == "hide new secretions from the parental units"
    write_task_file(tmp_path / "copy.tsv", spec, examples, header=report.header)
    assert (tmp_path / "copy.tsv").read_text() == text
    write_task_file(tmp_path / "new.tsv", spec, [dataclasses.replace(examples[0], text_a="hide old secrets")],
                    header=report.header)
    assert (tmp_path / "new.tsv").read_text() == "sentence\tlabel\nhide old secrets\t0\n"
