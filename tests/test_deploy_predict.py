"""Prediction with an exported student: ds_kdqat.deploy.predict.Predictor and `ds-kdqat predict`.

Tiny random students (2-layer BERT, a 23-word tokenizer; a 1-layer ViT on 8×8 gray images) are quantized and
exported once per module; the CLI is called in-process through ds_kdqat.cli.main.
"""

from __future__ import annotations

import io
import json
import math
import os
import types

import numpy as np
import pytest
import torch

import ds_kdqat
from ds_kdqat import cli
from ds_kdqat.deploy.predict import Prediction, Predictor, metric_spec
from ds_kdqat.errors import ConfigError, DataError

WORDS = ["the", "movie", "was", "good", "bad", "very", "plot", "acting", "boring", "fun", "not", "a", "film",
         "great", "at", "all", "and", "dull", "smart", "story", "cast", "quite", "warm"]
SENTENCES = ["the movie was good", "very bad acting", "a great film", "not fun at all the plot was boring",
             "good", "the acting was very very good and the plot was great", "bad film", "dull story", "warm cast",
             "quite smart"]


def tiny_tokenizer(folder):
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n", encoding="utf-8")
    return BertTokenizerFast(vocab=str(vocab), do_lower_case=True)


def export_text_student(root, spec, max_seq_length=16, seed=0):
    """A random 2-layer BERT for ``spec``, quantized (TernaryBERT) and exported to ``root/<spec.name>``."""
    from transformers import BertConfig, BertForSequenceClassification

    from ds_kdqat.deploy.artifact import export_student, task_description
    from ds_kdqat.quant import QuantConfig, quantize_model

    tokenizer = tiny_tokenizer(root / f"{spec.name}-tok")
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, num_labels=spec.num_labels)
    model = BertForSequenceClassification(config).eval()
    quantize_model(model, QuantConfig())
    out = root / spec.name
    export_student(model, out, task=task_description(spec, max_seq_length), preprocessing=tokenizer)
    return out


def custom_spec(labels=("negative", "positive")):
    from ds_kdqat.data.tasks import TaskSpec

    return TaskSpec(name="reviews", text_fields=("text",), label_field="stars", labels=labels, is_regression=False,
                    metrics=("macro_f1", "accuracy"), primary_metric="accuracy")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    from ds_kdqat.data.tasks import TASKS

    root = tmp_path_factory.mktemp("exports")
    return types.SimpleNamespace(single=export_text_student(root, custom_spec()),
                                 pair=export_text_student(root, TASKS["mrpc"], seed=1),
                                 regression=export_text_student(root, TASKS["stsb"], seed=2),
                                 cola=export_text_student(root, TASKS["cola"], seed=3))


@pytest.fixture(scope="module")
def single(exports):
    return Predictor(ds_kdqat.load_student(exports.single, "int8"))


def cli_run(capsys, *argv, stdin: bytes | None = None, monkeypatch=None):
    """``ds-kdqat predict ...``: (exit status, stdout, stderr)."""
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    status = cli.main(["predict", *map(str, argv), "--no_progress"])
    out, err = capsys.readouterr()
    return status, out, err


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


# --------------------------------------------------------------------------------------------- Predictor


def test_predictions_follow_the_input_order_with_named_labels(single):
    alone = [next(single.predict([s], batch_size=1)) for s in SENTENCES]
    assert list(single.predict(SENTENCES, batch_size=1)) == alone
    assert list(single.predict(SENTENCES[::-1], batch_size=1)) == alone[::-1]
    for prediction in alone:
        assert list(prediction.probabilities) == ["negative", "positive"]
        assert math.isclose(sum(prediction.probabilities.values()), 1.0, abs_tol=1e-9)
        assert prediction.label == max(prediction.probabilities, key=prediction.probabilities.get)
        assert prediction.record() == {"label": prediction.label, "probabilities": prediction.probabilities}


def test_a_batch_is_the_models_forward_on_the_input_order_padded_to_its_longest(single):
    """Batches are in input order and padded to their longest example (the activation quantizers' statistics are
    per batch, so this is what makes results reproducible); the probabilities are the softmax of the logits."""
    batch = SENTENCES[:4]
    inputs = single.encode(batch)
    longest = max(len(single.tokenizer(s)["input_ids"]) for s in batch)
    assert inputs["input_ids"].shape == (4, longest) and inputs["attention_mask"][1].sum() < longest
    with torch.no_grad():
        expected = torch.softmax(single.model(**inputs).logits.double(), -1)
    got = list(single.predict(SENTENCES, batch_size=4))[:4]
    for row, prediction in zip(expected, got):
        assert list(prediction.probabilities.values()) == pytest.approx(row.tolist(), abs=1e-12)


def test_long_texts_are_truncated_to_the_exports_max_seq_length(single):
    assert single.max_seq_length == 16
    inputs = single.encode([" ".join(["good"] * 100), "bad"])
    assert inputs["input_ids"].shape == (2, 16)


def test_pairs_and_regression(exports):
    pair = Predictor(ds_kdqat.load_student(exports.pair, "fakequant"))
    assert pair.is_pair
    inputs = pair.encode([("the movie", "a film"), ("good", "bad acting")])
    assert inputs["token_type_ids"].sum() > 0  # text_b is segment 1
    assert [p.label for p in pair.predict([("the movie", "a film")])][0] in ("0", "1")
    with pytest.raises(DataError, match="example 1: .*a pair of texts"):
        list(pair.predict([("a", "b"), "only one text"]))
    regression = Predictor(ds_kdqat.load_student(exports.regression, "int8"))
    scores = list(regression.predict([("good", "great"), ("bad", "dull")]))
    assert all(p.label is None and isinstance(p.score, float) for p in scores)
    assert scores[0].record() == {"score": scores[0].score}


def test_unknown_kinds_and_models_without_export_info_are_refused(tmp_path):
    """(QA exports are predicted: tests/test_deploy_predict_qa.py.)"""
    task = {"name": "ner", "kind": "token_classification", "labels": [], "text_fields": ["tokens"]}
    model = types.SimpleNamespace(kdqat_export=types.SimpleNamespace(folder=tmp_path, task=task))
    with pytest.raises(ConfigError, match="'token_classification'.*classification, regression, "
                                          "image_classification, qa"):
        Predictor(model)
    with pytest.raises(ConfigError, match="kdqat_export"):
        Predictor(torch.nn.Linear(2, 2))


def test_image_export_predicts_from_image_files(tmp_path):
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification

    from ds_kdqat.data.image_encode import ImageFormat
    from ds_kdqat.data.tasks import TASKS
    from ds_kdqat.deploy.artifact import export_student, task_description
    from ds_kdqat.quant import QuantConfig, quantize_model

    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32, num_labels=3)
    model = ViTForImageClassification(config).eval()
    quantize_model(model, QuantConfig(preset="vit_w2"))
    spec = TASKS["image_folder"].with_labels(["bird", "cat", "dog"])
    export_student(model, tmp_path / "exp", task=task_description(spec, None, "pixels", False),
                   preprocessing=ImageFormat.for_model(config))
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(np.full((6, 6), 80 * i, dtype=np.uint8)).save(paths[-1])
    predictor = Predictor(ds_kdqat.load_student(tmp_path / "exp", "fakequant"))
    assert predictor.encode(paths)["pixel_values"].shape == (3, 1, 8, 8)
    predictions = list(predictor.predict(paths, batch_size=2))
    assert [p.label in ("bird", "cat", "dog") for p in predictions] == [True] * 3
    (tmp_path / "list.csv").write_text("image,label\n" + "".join(f"img{i}.png,cat\n" for i in range(3)))
    assert cli.main(["predict", str(tmp_path / "exp"), "--input", str(tmp_path / "list.csv"), "--batch_size", "2",
                     "--backend", "fakequant", "--output", str(tmp_path / "p.jsonl"), "--no_progress"]) == 0
    assert [r["label"] for r in jsonl((tmp_path / "p.jsonl").read_text())] == [p.label for p in predictions]
    with pytest.raises(DataError, match="nope.png: no such image file"):
        list(predictor.predict([tmp_path / "nope.png"]))


def test_metric_spec_puts_the_primary_metric_first():
    from ds_kdqat.data.tasks import TASKS
    from ds_kdqat.deploy.artifact import task_description

    mrpc = metric_spec(task_description(TASKS["mrpc"], 16))
    assert mrpc.metrics == ("f1", "accuracy") and mrpc.label_field == "Quality"
    custom = metric_spec({"name": "custom", "kind": "classification", "labels": ["a", "b"], "text_fields": ["t"],
                          "primary_metric": "accuracy"})
    assert custom.metrics == ("accuracy", "macro_f1") and custom.label_field == "label"


# --------------------------------------------------------------------------------------------- the command


def expected_records(predictor, examples, batch_size=32):
    return [p.record() for p in predictor.predict(examples, batch_size)]


def test_lines_from_stdin_and_tables_in_every_format_give_the_same_records(exports, single, tmp_path, capsys,
                                                                            monkeypatch):
    expected = expected_records(single, SENTENCES, 4)
    status, out, _ = cli_run(capsys, exports.single, "--batch_size", 4,
                             stdin=("\n".join(SENTENCES) + "\n\n").encode(), monkeypatch=monkeypatch)
    assert status == 0 and jsonl(out) == expected
    (tmp_path / "in.tsv").write_text("id\ttext\n" + "".join(f"{i}\t{s}\n" for i, s in enumerate(SENTENCES)))
    (tmp_path / "in.csv").write_text("text,id\n" + "".join(f'"{s}",{i}\n' for i, s in enumerate(SENTENCES)))
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"review": {"body": s}}) + "\n" for s in SENTENCES))
    (tmp_path / "in.txt").write_text("\n".join(SENTENCES))
    for name, extra in (("in.tsv", []), ("in.csv", []), ("in.jsonl", ["--text_column", "review.body"]),
                        ("in.txt", [])):
        status, out, err = cli_run(capsys, exports.single, "--input", tmp_path / name, "--batch_size", 4, *extra)
        assert (status, jsonl(out)) == (0, expected), (name, err)


def test_packed2_weights_from_the_command_line(exports, single, capsys, monkeypatch):
    """--weights packed2: the int8 backend with 2-bit resident codes; the same predictions (up to float rounding
    of the epilogue: the int8 codes may run by oneDNN's kernel); refused for another backend."""
    expected = expected_records(single, SENTENCES, 4)
    status, out, err = cli_run(capsys, exports.single, "--batch_size", 4, "--weights", "packed2",
                               stdin=("\n".join(SENTENCES) + "\n").encode(), monkeypatch=monkeypatch)
    assert status == 0, err
    got = jsonl(out)
    assert [r["label"] for r in got] == [r["label"] for r in expected]
    for record, reference in zip(got, expected):
        assert record["probabilities"] == pytest.approx(reference["probabilities"], abs=1e-5)
    status, _, err = cli_run(capsys, exports.single, "--backend", "fakequant", "--weights", "packed2")
    assert status == 2 and "--weights: packed2 is a mode of the int8 backend" in err


def test_pair_lines_are_split_at_the_tab(exports, tmp_path, capsys):
    pair = Predictor(ds_kdqat.load_student(exports.pair, "int8"))
    pairs = [("the movie was good", "a great film"), ("bad film", "dull story"), ("good", "good")]
    (tmp_path / "pairs.txt").write_text("".join(f"{a}\t{b}\n" for a, b in pairs))
    status, out, _ = cli_run(capsys, exports.pair, "--input", tmp_path / "pairs.txt")
    assert status == 0 and jsonl(out) == expected_records(pair, pairs)
    (tmp_path / "one.txt").write_text("a\tb\nonly one text\n")
    status, _, err = cli_run(capsys, exports.pair, "--input", tmp_path / "one.txt")
    assert status == 2 and f"{tmp_path / 'one.txt'}:2: expected two non-empty texts" in err


def test_tsv_output_has_a_header_and_one_row_per_example(exports, single, tmp_path, capsys):
    (tmp_path / "in.txt").write_text("\n".join(SENTENCES[:3]))
    status, out, _ = cli_run(capsys, exports.single, "--input", tmp_path / "in.txt", "--output_format", "tsv")
    lines = out.splitlines()
    assert status == 0 and lines[0] == "label\tprob_negative\tprob_positive" and len(lines) == 4
    for line, prediction in zip(lines[1:], single.predict(SENTENCES[:3])):
        label, p_neg, p_pos = line.split("\t")
        assert label == prediction.label and float(p_pos) == prediction.probabilities["positive"]


def test_eval_prints_the_task_metrics_primary_first(exports, tmp_path, capsys):
    """mrpc (primary f1, then accuracy): the metrics printed equal those computed by hand from the predictions."""
    pairs = [("the movie was good", "a great film"), ("bad film", "dull story"), ("good", "good"),
             ("very bad acting", "not fun at all"), ("warm cast", "smart story"), ("the plot", "the film")]
    gold = ["1", "0", "1", "1", "0", "0"]
    rows = "".join(f"{g}\t{a}\t{b}\n" for (a, b), g in zip(pairs, gold))
    (tmp_path / "dev.tsv").write_text("Quality\t#1 String\t#2 String\n" + rows)
    output = tmp_path / "pred.jsonl"
    status, out, err = cli_run(capsys, exports.pair, "--input", tmp_path / "dev.tsv", "--eval", "--output", output,
                               "--batch_size", 4)
    assert status == 0, err
    predicted = [r["label"] for r in jsonl(output.read_text())]
    tp = sum(p == g == "1" for p, g in zip(predicted, gold))
    fp = sum(p == "1" and g == "0" for p, g in zip(predicted, gold))
    fn = sum(p == "0" and g == "1" for p, g in zip(predicted, gold))
    metrics = json.loads(out)
    assert list(metrics)[:2] == ["f1", "accuracy"] and metrics["examples"] == 6 and metrics["task"] == "mrpc"
    assert metrics["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    assert metrics["accuracy"] == pytest.approx(sum(p == g for p, g in zip(predicted, gold)) / 6)


def test_eval_of_a_regression_and_of_a_relabelled_column(exports, tmp_path, capsys):
    pairs = [("good", "great"), ("bad", "dull"), ("the movie", "a film"), ("fun", "boring")]
    scores = [4.5, 3.0, 2.25, 0.5]
    (tmp_path / "sts.jsonl").write_text("".join(json.dumps({"sentence1": a, "sentence2": b, "sim": s}) + "\n"
                                                for (a, b), s in zip(pairs, scores)))
    status, out, err = cli_run(capsys, exports.regression, "--input", tmp_path / "sts.jsonl", "--eval",
                               "--label_column", "sim", "--output", tmp_path / "p.tsv", "--output_format", "tsv")
    assert status == 0, err
    lines = (tmp_path / "p.tsv").read_text().splitlines()
    predicted = [float(x) for x in lines[1:]]
    assert lines[0] == "score" and len(predicted) == 4
    metrics = json.loads(out)
    assert list(metrics)[:2] == ["pearson", "spearman"]
    assert metrics["pearson"] == pytest.approx(np.corrcoef(predicted, scores)[0, 1], abs=1e-9)


def test_a_headerless_glue_file_is_read_with_the_tasks_columns(exports, tmp_path, capsys, monkeypatch):
    """CoLA's dev.tsv has no header (source, label, notes, sentence); --eval scores it with MCC."""
    sentences = SENTENCES[:6]
    gold = ["1", "0", "1", "0", "1", "0"]
    (tmp_path / "dev.tsv").write_text("".join(f"\t{g}\t\t{s}\n" for s, g in zip(sentences, gold)))
    status, out, err = cli_run(capsys, exports.cola, "--input", tmp_path / "dev.tsv", "--eval", "--output",
                               tmp_path / "p.jsonl")
    assert status == 0, err
    predicted = [r["label"] for r in jsonl((tmp_path / "p.jsonl").read_text())]
    tp, tn, fp, fn = (sum(p == a and g == b for p, g in zip(predicted, gold))
                      for a, b in (("1", "1"), ("0", "0"), ("1", "0"), ("0", "1")))
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert json.loads(out)["mcc"] == pytest.approx((tp * tn - fp * fn) / denominator if denominator else 0.0)
    # the same rows from stdin, as a TSV with a header
    table = "sentence\tlabel\n" + "".join(f"{s}\t{g}\n" for s, g in zip(sentences, gold))
    status, out, err = cli_run(capsys, exports.cola, "--format", "tsv", "--output_format", "tsv",
                               stdin=table.encode(), monkeypatch=monkeypatch)
    assert status == 0 and [line.split("\t")[0] for line in out.splitlines()[1:]] == predicted, err


def test_the_output_file_is_atomic_and_never_silently_replaced(exports, tmp_path, capsys, monkeypatch):
    (tmp_path / "in.txt").write_text("\n".join(SENTENCES))
    output = tmp_path / "pred.jsonl"
    assert cli_run(capsys, exports.single, "--input", tmp_path / "in.txt", "--output", output)[0] == 0
    first = output.read_bytes()
    assert len(jsonl(first.decode())) == len(SENTENCES)
    (tmp_path / "in.txt").write_text("\n".join(SENTENCES[:2]))
    status, _, err = cli_run(capsys, exports.single, "--input", tmp_path / "in.txt", "--output", output)
    assert status == 2 and "exists; pass --overwrite" in err and output.read_bytes() == first

    calls = []

    def fail_on_second_batch(self, batch, first_index=0, _real=Predictor.predict_batch):
        calls.append(len(batch))
        if len(calls) == 2:
            raise RuntimeError("killed half-way")
        return _real(self, batch, first_index)

    monkeypatch.setattr(Predictor, "predict_batch", fail_on_second_batch)
    (tmp_path / "in.txt").write_text("\n".join(SENTENCES))
    status, _, _ = cli_run(capsys, exports.single, "--input", tmp_path / "in.txt", "--output", output,
                           "--overwrite", "--batch_size", 3)
    assert status == 1 and output.read_bytes() == first  # the old file, whole; no half-written one
    assert sorted(os.listdir(tmp_path)) == ["in.txt", "pred.jsonl"]  # no temporary file left
    monkeypatch.undo()
    status, _, _ = cli_run(capsys, exports.single, "--input", tmp_path / "in.txt", "--output", output, "--overwrite",
                           "--batch_size", 3)
    assert status == 0 and len(jsonl(output.read_text())) == len(SENTENCES)


@pytest.mark.parametrize("name, content, extra, message", [
    ("in.tsv", "id\tbody\n1\tgood\n", [], r"in.tsv:1: no text column 'text'; the input has the columns \['id', "
                                          r"'body'\]"),
    ("in.jsonl", '{"text": "good"}\n{"text": "bad"\n', [], r"in.jsonl:2: malformed JSON"),
    ("in.csv", "text,id\ngood,1\n\"\",2\n", [], r"in.csv:3: empty text in column 'text'"),
    ("in.txt", "good\n\nbad\n", [], r"in.txt:2: blank line"),
    ("in.txt", "good\tbad\n", [], r"in.txt:1: holds a TAB"),
    ("in.tsv", "text\tstars\ngood\tpositive\nbad\t3\n", ["--eval", "--label_column", "stars"],
     r"in.tsv:3: label '3' in column 'stars' is not a class of the export \(classes: \['negative', 'positive'\]\)"),
    ("in.tsv", "text\ngood\n", ["--eval"], r"in.tsv:1: no label column 'stars'"),
    ("in.txt", "good\n", ["--eval"], r"config error: --eval: needs a labelled table"),
    ("in.txt", "good\n", ["--batch_size", "0"], r"--batch_size: expected a positive integer"),
    ("in.tsv", "text\ngood\n", ["--text_columns", "a", "b"], r"--text_columns: the export's task takes 1 text"),
    ("missing.tsv", None, [], r"missing.tsv: no such file"),
])
def test_bad_input_is_exit_2_naming_the_file_and_line(exports, tmp_path, capsys, name, content, extra, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    status, out, err = cli_run(capsys, exports.single, "--input", tmp_path / name, *extra)
    assert status == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and __import__("re").search(message, err), err


def test_a_folder_that_is_no_export_is_a_data_error(tmp_path, capsys):
    (tmp_path / "in.txt").write_text("good\n")
    status, _, err = cli_run(capsys, tmp_path, "--input", tmp_path / "in.txt")
    assert status == 2 and "manifest.json" in err


def test_prediction_record_shapes():
    assert Prediction(score=1.5).record() == {"score": 1.5}
    assert Prediction(label="a", probabilities={"a": 1.0}).record() == {"label": "a", "probabilities": {"a": 1.0}}
