"""Extractive-QA prediction with an exported student: Predictor.predict_qa and `ds-kdqat predict` on a QA export.

A tiny random 2-layer BERT QA head (the 23-word tokenizer of test_deploy_predict) is quantized and exported once
per module, as SQuAD v1.1 and v2.0 students with short windows (16 tokens, doc_stride 4), so that every context
spans several windows. The reference is the training side's evaluation: TeacherStudentEngine.predict and .score
on the QADataset of the same questions (ds_kdqat.data.qa, qa_post, qa_metrics).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import types

import pytest
import torch

import ds_kdqat
from ds_kdqat.data.qa import QASettings, encode_qa, read_squad
from ds_kdqat.data.qa_metrics import squad_em_f1
from ds_kdqat.deploy.artifact import check_task, qa_settings_of
from ds_kdqat.deploy.predict import Predictor, QAPrediction
from ds_kdqat.errors import ConfigError, DataError

from tests.test_deploy_predict import WORDS, cli_run, jsonl, tiny_tokenizer

V1 = QASettings(version=1, max_seq_length=16, doc_stride=4, max_query_length=4, max_answer_length=3)
V2 = QASettings(version=2, max_seq_length=16, doc_stride=4, max_query_length=4, max_answer_length=3,
                null_score_diff_threshold=0.02)  # with seed 1: some questions answered, some not
BATCH = 3  # windows per forward pass, here and in the training-side reference


def export_qa_student(root, name, settings, seed=0):
    """A random 2-layer BERT QA model, quantized (TernaryBERT) and exported with ``settings`` (None: an export
    from before QA settings were recorded)."""
    from transformers import BertConfig, BertForQuestionAnswering

    from ds_kdqat.data.tasks import TASKS
    from ds_kdqat.deploy.artifact import export_student, task_description
    from ds_kdqat.quant import QuantConfig, quantize_model

    tokenizer = tiny_tokenizer(root / f"{name}-tok")
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    model = BertForQuestionAnswering(config).eval()
    quantize_model(model, QuantConfig())
    task = task_description(TASKS["squad"], settings.max_seq_length if settings else None, qa=settings)
    export_student(model, root / name, task=task, preprocessing=tokenizer)
    return root / name


def squad_data(n_paragraphs, seed, unanswerable=0):
    """SQuAD JSON of random contexts (12-20 words of WORDS), three questions each, the answer a 1-2 word span of
    the context; the first ``unanswerable`` questions of each paragraph are v2.0 unanswerable ones."""
    rng = random.Random(seed)
    paragraphs = []
    for p in range(n_paragraphs):
        words = [rng.choice(WORDS) for _ in range(rng.randint(12, 20))]
        context = " ".join(words)
        qas = []
        for k in range(3):
            qid, question = f"p{p}q{k}", " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
            if k < unanswerable:
                qas.append({"id": qid, "question": question, "is_impossible": True, "answers": []})
                continue
            first = rng.randrange(len(words) - 1)
            text = " ".join(words[first:first + rng.randint(1, 2)])
            start = len(" ".join(words[:first])) + (1 if first else 0)
            qas.append({"id": qid, "question": question, "answers": [{"text": text, "answer_start": start}]})
        paragraphs.append({"context": context, "qas": qas})
    return {"version": "1.1", "data": [{"title": "tiny", "paragraphs": paragraphs}]}


@pytest.fixture(scope="module")
def qa(tmp_path_factory):
    root = tmp_path_factory.mktemp("qa")
    (root / "dev.json").write_text(json.dumps(squad_data(3, seed=0)))
    (root / "dev-v2.json").write_text(json.dumps(squad_data(3, seed=1, unanswerable=1)))
    return types.SimpleNamespace(root=root, v1=export_qa_student(root, "squad-v1", V1),
                                 v2=export_qa_student(root, "squad-v2", V2, seed=1),
                                 dev=root / "dev.json", dev_v2=root / "dev-v2.json")


def training_side(model, examples, settings, batch_size=BATCH):
    """(answers, EM/F1) of the training evaluation: TeacherStudentEngine.predict/.score on the QADataset."""
    from ds_kdqat.data.qa_post import predict_answers
    from ds_kdqat.data.tasks import TASKS
    from ds_kdqat.engine import TeacherStudentEngine

    tokenizer = Predictor(model).tokenizer
    dataset = encode_qa(examples, tokenizer, settings)
    engine = types.SimpleNamespace(run=types.SimpleNamespace(micro_batch_size=batch_size), spec=TASKS["squad"],
                                   dist=types.SimpleNamespace(world_size=1, rank=0),
                                   _device_of=lambda m: torch.device("cpu"))
    logits = TeacherStudentEngine.predict(engine, dataset, model, local=True)
    return predict_answers(dataset.examples, dataset.features, logits, settings), dataset.score(logits)


# --------------------------------------------------------------------------------------------- Predictor


@pytest.mark.parametrize("backend", ["fakequant", "int8"])
def test_answers_are_context_spans_equal_to_the_training_evaluation(qa, backend):
    predictor = Predictor(ds_kdqat.load_student(qa.v1, backend))
    assert predictor.is_qa and predictor.qa_settings == V1
    examples = read_squad(qa.dev)
    predictions = predictor.predict_qa(examples, batch_size=BATCH)
    assert [p.id for p in predictions] == [ex.id for ex in examples]
    features = predictor.qa_features(examples)
    assert len(features) > 2 * len(examples) // 3  # long contexts: several windows per question
    for prediction, example in zip(predictions, examples):
        assert prediction.answer and prediction.answer in example.context  # v1.1 always answers with a span
        assert isinstance(prediction.score, float)
    answers, _ = training_side(predictor.model, examples, V1)
    assert {p.id: p.answer for p in predictions} == answers
    assert list(predictor.predict(examples, batch_size=BATCH)) == predictions  # predict() dispatches


def test_onnx_backend_answers_like_int8(qa, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from ds_kdqat.deploy.onnx_export import export_onnx

    folder = tmp_path / "onnx"
    shutil.copytree(qa.v1, folder)
    export_onnx(folder)
    examples = read_squad(qa.dev)
    onnx = Predictor(ds_kdqat.load_student(folder, "onnx")).predict_qa(examples, BATCH)
    int8 = Predictor(ds_kdqat.load_student(folder, "int8")).predict_qa(examples, BATCH)
    assert [p.answer for p in onnx] == [p.answer for p in int8]
    assert [p.score for p in onnx] == pytest.approx([p.score for p in int8], abs=1e-3)
    answers, _ = training_side(ds_kdqat.load_student(folder, "onnx"), examples, V1)
    assert {p.id: p.answer for p in onnx} == answers


def test_v2_null_answers_and_scores(qa):
    predictor = Predictor(ds_kdqat.load_student(qa.v2, "int8"))
    examples = read_squad(qa.dev_v2, version=2)
    assert predictor.qa_settings == V2  # the threshold is the manifest's
    predictions = predictor.predict_qa(examples, BATCH)
    assert {p.answer == "" for p in predictions} == {True, False}
    answers, _ = training_side(predictor.model, examples, V2)
    assert {p.id: p.answer for p in predictions} == answers
    assert all(p.answer in ex.context for p, ex in zip(predictions, examples))
    # a huge threshold never answers "", a very negative one always does
    for threshold, empty in ((1e9, False), (-1e9, True)):
        predictor.qa_settings = QASettings(**{**V2.__dict__, "null_score_diff_threshold": threshold})
        assert {p.answer == "" for p in predictor.predict_qa(examples, BATCH)} == {empty}


def test_mappings_are_questions_and_bad_ones_are_named(qa):
    predictor = Predictor(ds_kdqat.load_student(qa.v1, "fakequant"))
    example = read_squad(qa.dev)[0]
    record = {"id": example.id, "question": example.question, "context": example.context}
    assert list(predictor.predict([record], 1)) == predictor.predict_qa([example], 1)
    assert isinstance(predictor.predict_qa([example], 1)[0], QAPrediction)
    with pytest.raises(DataError, match="example 1: 'context': expected a string, missing"):
        list(predictor.predict([record, {"id": "x", "question": "why"}]))
    with pytest.raises(ConfigError, match="cannot be overridden"):
        Predictor(predictor.model, max_seq_length=32)


def test_an_export_without_qa_settings_falls_back_to_the_defaults(qa, tmp_path, caplog):
    folder = export_qa_student(tmp_path, "old", None)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert "qa" not in manifest["task"] and manifest["task"]["max_seq_length"] is None
    with caplog.at_level(logging.WARNING, logger="ds_kdqat.deploy.predict"):
        predictor = Predictor(ds_kdqat.load_student(folder, "int8"))
    assert predictor.qa_settings == QASettings()
    assert "does not record task.qa.version" in caplog.text and "doc_stride=128" in caplog.text
    examples = read_squad(qa.dev)
    predictions = predictor.predict_qa(examples, BATCH)
    assert all(p.answer in ex.context for p, ex in zip(predictions, examples))


@pytest.mark.parametrize("key, value, message", [
    ("doc_stride", 0, "task.qa.doc_stride: expected an integer >= 1, got 0"),
    ("version", 3, "task.qa.version: got 3"),
    ("null_score_diff_threshold", "x", "task.qa.null_score_diff_threshold: expected a finite number"),
    ("doc_stride", 9, "task.qa.doc_stride: 9 must be below the context room of a window"),
])
def test_bad_qa_settings_in_the_manifest_are_data_errors_naming_the_key(qa, tmp_path, key, value, message):
    folder = tmp_path / "bad"
    shutil.copytree(qa.v1, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["task"]["qa"][key] = value
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=f"manifest.json: {message}"):
        ds_kdqat.load_student(folder, "fakequant")


# --------------------------------------------------------------------------------------------- the command


def test_command_writes_answers_as_jsonl_or_squad(qa, tmp_path, capsys, monkeypatch):
    predictor = Predictor(ds_kdqat.load_student(qa.v1, "int8"))
    expected = [p.record() for p in predictor.predict_qa(read_squad(qa.dev), BATCH)]
    out = tmp_path / "p.jsonl"
    status, stdout, _ = cli_run(capsys, qa.v1, "--input", qa.dev, "--batch_size", BATCH, "--output", out)
    assert status == 0 and stdout == "" and jsonl(out.read_text()) == expected
    status, stdout, _ = cli_run(capsys, qa.v1, "--input", qa.dev, "--batch_size", BATCH, "--output_format", "squad")
    assert status == 0 and json.loads(stdout) == {r["id"]: r["answer"] for r in expected}
    # JSON Lines questions from stdin: the same windows in the same order, so the same answers
    lines = "".join(json.dumps({"id": ex.id, "question": ex.question, "context": ex.context}) + "\n"
                    for ex in read_squad(qa.dev))
    status, stdout, _ = cli_run(capsys, qa.v1, "--batch_size", BATCH, stdin=lines.encode(), monkeypatch=monkeypatch)
    assert status == 0 and jsonl(stdout) == expected
    # the output file is not replaced without --overwrite
    status, _, err = cli_run(capsys, qa.v1, "--input", qa.dev, "--output", out)
    assert status == 2 and "--overwrite" in err and jsonl(out.read_text()) == expected


def test_eval_prints_squad_em_f1_of_the_answers(qa, tmp_path, capsys):
    examples = read_squad(qa.dev_v2, version=2)
    predictor = Predictor(ds_kdqat.load_student(qa.v2, "fakequant"))
    answers = {p.id: p.answer for p in predictor.predict_qa(examples, BATCH)}
    expected = squad_em_f1(answers, {ex.id: ex.answer_texts for ex in examples})
    assert {"HasAns_f1", "NoAns_f1"} <= set(expected) and 0 < expected["NoAns_exact_match"]
    out = tmp_path / "predictions.json"
    status, stdout, _ = cli_run(capsys, qa.v2, "--input", qa.dev_v2, "--eval", "--backend", "fakequant",
                                "--batch_size", BATCH, "--output", out, "--output_format", "squad")
    assert status == 0 and json.loads(out.read_text()) == answers
    printed = json.loads(stdout)
    assert list(printed)[0] == "f1" and printed["examples"] == len(examples) and printed["task"] == "squad"
    assert {k: printed[k] for k in expected} == pytest.approx(expected, abs=1e-12)
    _, training = training_side(predictor.model, examples, V2)
    assert printed["f1"] == pytest.approx(training["f1"]) and printed["exact_match"] == training["exact_match"]


@pytest.mark.parametrize("name, content, extra, message", [
    ("q.jsonl", '{"id": "a", "question": "why", "context": "good"}\n{"id": "b", "context": "bad"}\n', [],
     "q.jsonl:2: record: missing key 'question'"),
    ("q.jsonl", '{"id": "a", "question": "why", "context": "good"}\n', ["--eval"],
     "q.jsonl:1: record (--eval needs the gold answers): missing key 'answers'"),
    ("q.jsonl", '{"id": "a", "question": "why", "context": " "}\n', [], "q.jsonl:1: empty context"),
    ("q.json", '{"data": [{"paragraphs": [{"context": "good"}]}]}', [], "q.json: data[0].paragraphs[0]: missing "
                                                                         "key 'qas'"),
    ("q.json", '{"data": [{"paragraphs": [{"context": "a", "qas": [{"id": "q1", "question": "why"}]}]}]}',
     ["--eval"], "q.json:q1: question: missing key 'answers'"),
    ("q.json", '{"data": [', [], "q.json: not a JSON file"),
    ("q.tsv", "question\tcontext\n", [], "--format: got 'tsv'; a QA export reads squad or jsonl"),
    ("q.jsonl", '{"id": "a", "question": "why", "context": "good"}\n', ["--output_format", "tsv"],
     "--output_format: got 'tsv'"),
])
def test_bad_qa_input_is_exit_2_naming_the_file_and_what_is_wrong(qa, tmp_path, capsys, name, content, extra,
                                                                   message):
    (tmp_path / name).write_text(content)
    fmt = ["--format", "tsv"] if name.endswith(".tsv") else []
    status, _, err = cli_run(capsys, qa.v1, "--input", tmp_path / name, *fmt, *extra)
    assert status == 2 and message in err, err


def test_squad_formats_are_refused_for_a_classifier(tmp_path, capsys):
    from ds_kdqat.data.tasks import TASKS
    from tests.test_deploy_predict import export_text_student

    folder = export_text_student(tmp_path, TASKS["sst2"])
    (tmp_path / "x.txt").write_text("good\n")
    status, _, err = cli_run(capsys, folder, "--input", tmp_path / "x.txt", "--output_format", "squad")
    assert status == 2 and "--output_format: squad is for extractive-QA exports" in err


# --------------------------------------------------------------------------------------------- what exports record


def _data_config(**qa_keys):
    keys = {"version": None, "doc_stride": None, "max_query_length": None, "max_answer_length": None,
            "null_score_diff_threshold": None, **qa_keys}
    return types.SimpleNamespace(max_seq_length=48, **keys)


def test_the_training_pipeline_records_the_qa_settings(qa):
    from transformers import BertConfig, BertForQuestionAnswering

    from ds_kdqat import pipeline
    from ds_kdqat.data.tasks import TASKS

    data = _data_config(version=2, doc_stride=16, max_query_length=16, null_score_diff_threshold=-1.5)
    ctx = types.SimpleNamespace(spec=TASKS["squad"], run=types.SimpleNamespace(kdqat=types.SimpleNamespace(data=data)))
    model = BertForQuestionAnswering(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=32))
    task = pipeline._task_description(ctx, model)
    assert task["max_seq_length"] == 48 and task["qa"] == {
        "version": 2, "doc_stride": 16, "max_query_length": 16, "max_answer_length": 30,
        "null_score_diff_threshold": -1.5}
    assert check_task(task, "manifest.json") is task
    assert qa_settings_of(task, "manifest.json") == (QASettings(2, 48, 16, 16, 30, -1.5), [])


def test_the_export_command_records_the_run_configs_qa_settings():
    from ds_kdqat.commands.export import recorded_qa_settings
    from ds_kdqat.data.tasks import TASKS

    run_config = types.SimpleNamespace(kdqat=types.SimpleNamespace(data=_data_config(doc_stride=8,
                                                                                     max_query_length=8)))
    settings = recorded_qa_settings(TASKS["squad"], run_config, 32)
    assert (settings.max_seq_length, settings.doc_stride, settings.max_query_length, settings.version) == (32, 8, 8, 1)
    assert recorded_qa_settings(TASKS["squad"], None, 32) is None  # a bare student folder: nothing to record
    assert recorded_qa_settings(TASKS["sst2"], run_config, 32) is None


def _export_args(*flags: str):
    import argparse

    from ds_kdqat.commands.export import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["student", *flags])


def test_the_export_command_takes_qa_settings_as_flags():
    from ds_kdqat.commands.export import recorded_qa_settings
    from ds_kdqat.data.tasks import TASKS

    squad = TASKS["squad"]
    args = _export_args("--task", "squad", "--qa_version", "2", "--doc_stride", "10", "--null_score_diff_threshold",
                        "-0.5")
    # a bare student folder: the flags over the defaults, whose max_query_length 64 leaves no context at 48 tokens
    with pytest.raises(ConfigError, match="no context token is left") as caught:
        recorded_qa_settings(squad, None, 48, args)
    assert caught.value.path == "--max_query_length"
    args = _export_args("--task", "squad", "--qa_version", "2", "--doc_stride", "10", "--max_query_length", "16",
                        "--null_score_diff_threshold", "-0.5")
    assert recorded_qa_settings(squad, None, 48, args) == QASettings(2, 48, 10, 16, 30, -0.5, 20)
    # over a run config's: the flags win, the rest is the run's
    run_config = types.SimpleNamespace(kdqat=types.SimpleNamespace(data=_data_config(doc_stride=8, max_query_length=8,
                                                                                     max_answer_length=12)))
    got = recorded_qa_settings(squad, run_config, 32, _export_args("--max_answer_length", "5"))
    assert (got.version, got.max_seq_length, got.doc_stride, got.max_query_length, got.max_answer_length) == \
        (1, 32, 8, 8, 5)


@pytest.mark.parametrize("flags, named", [
    (["--qa_version", "3"], "--qa_version"),
    (["--doc_stride", "0"], "--doc_stride"),
    (["--max_answer_length", "-2"], "--max_answer_length"),
    (["--null_score_diff_threshold", "nan"], "--null_score_diff_threshold"),
    (["--max_query_length", "46"], "--max_query_length"),  # 48 - 46 - 3: no context token left
    (["--max_query_length", "40"], "--doc_stride"),  # 48 - 40 - 3 = 5 context tokens; stride 10 does not fit
    (["--doc_stride", "40", "--max_query_length", "8"], "--doc_stride"),  # room 37
])
def test_bad_qa_flags_name_the_flag(flags, named):
    from ds_kdqat.commands.export import recorded_qa_settings
    from ds_kdqat.data.tasks import TASKS

    args = _export_args("--doc_stride", "10", *flags) if "--doc_stride" not in flags else _export_args(*flags)
    with pytest.raises(ConfigError) as caught:
        recorded_qa_settings(TASKS["squad"], None, 48, args)
    assert caught.value.path == named


def test_qa_flags_for_another_task_are_refused():
    from ds_kdqat.commands.export import recorded_qa_settings
    from ds_kdqat.data.tasks import TASKS

    with pytest.raises(ConfigError, match="only for a question-answering task") as caught:
        recorded_qa_settings(TASKS["sst2"], None, 48, _export_args("--max_answer_length", "5"))
    assert caught.value.path == "--max_answer_length"
