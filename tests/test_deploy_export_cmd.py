"""`ds-kdqat export`: a run folder or a saved student folder → the self-contained export, and its refusals.

The saved student is made as ds_kdqat.pipeline.save_hf makes one (save_pretrained of the quantized model, the
tokenizer, ds_kdqat.quant.student_files.write_student_files); the CLI is called in-process.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import pytest
import torch

import ds_kdqat
from ds_kdqat import cli

WORDS = ["the", "movie", "was", "good", "bad", "very", "plot", "acting", "boring", "fun", "a", "film", "great"]


def save_student(folder, num_labels=2, id2label=None, seed=0):
    """A tiny quantized BERT saved like the pipeline saves the trained student."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from ds_kdqat.quant import QuantConfig, quantize_model
    from ds_kdqat.quant.student_files import write_student_files

    folder.mkdir(parents=True)
    vocab = folder.parent / f"{folder.name}-vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab=str(vocab), do_lower_case=True)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, num_labels=num_labels)
    if id2label:
        config.id2label = dict(enumerate(id2label))
        config.label2id = {name: i for i, name in enumerate(id2label)}
    model = BertForSequenceClassification(config).eval()
    quant = QuantConfig()
    quantize_model(model, quant)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    model.save_pretrained(folder, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    write_student_files(model, str(folder), quant)
    return folder


def write_run_config(run, data: dict):
    """``run/config.json`` as the pipeline writes it (the resolved run config)."""
    from ds_kdqat.config import parse_config

    config = parse_config({"train_micro_batch_size_per_gpu": 8,
                           "kdqat": {"output_dir": str(run), "data": data,
                                     "model": {"teacher": "unused", "local_files_only": True}}})
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(config.to_json(), indent=2))
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "sst2-run"
    write_run_config(run, {"task": "sst2", "data_dir": "glue/SST-2", "max_seq_length": 24})
    save_student(run / "student")
    return run


def export(capsys, *argv):
    status = cli.main(["export", *map(str, argv)])
    out, err = capsys.readouterr()
    return status, out, err


def manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def tree(folder):
    """Every file under ``folder`` with its bytes."""
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files}


def test_a_run_folder_exports_to_student_packed_with_its_task(run_dir, capsys):
    from ds_kdqat.data.tasks import TASKS
    from ds_kdqat.pipeline import load_student

    status, out, err = export(capsys, run_dir)
    packed = run_dir / "student_packed"
    assert status == 0, err
    assert out.splitlines()[0].startswith("W-E-A 2-2-8: ") and out.splitlines()[-1] == str(packed)
    task = manifest(packed)["task"]
    assert task == {"name": "sst2", "kind": "classification", "labels": ["0", "1"], "text_fields": ["sentence"],
                    "label_field": "label", "max_seq_length": 24, "metrics": ["accuracy"],
                    "primary_metric": "accuracy", "input_kind": "tokens", "token_type_ids": True}
    assert (packed / "tokenizer.json").is_file() or (packed / "vocab.txt").is_file()
    reference = load_student(str(run_dir / "student"), TASKS["sst2"]).eval()
    exported = ds_kdqat.load_student(packed, "fakequant")
    ids = torch.tensor([[2, 8, 6, 3, 0], [2, 10, 11, 12, 3]])
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids, attention_mask=(ids != 0).long()).logits,
                                   reference(input_ids=ids, attention_mask=(ids != 0).long()).logits)

    # the run's own export is replaced without --overwrite (it is the training job's export of this student)
    status, _, err = export(capsys, run_dir, "--ternary_packing", "base3")
    assert status == 0 and manifest(packed)["ternary_packing"] == "base3"
    # an export elsewhere is replaced only with --overwrite
    status, _, err = export(capsys, run_dir, "--out", run_dir.parent / "elsewhere")
    assert status == 0, err
    status, _, err = export(capsys, run_dir, "--out", run_dir.parent / "elsewhere")
    assert status == 2 and "already holds an export; pass --overwrite" in err
    status, _, err = export(capsys, run_dir, "--out", run_dir.parent / "elsewhere", "--overwrite")
    assert status == 0, err


def test_a_student_folder_in_a_run_reads_the_runs_task_and_needs_out(run_dir, tmp_path, capsys):
    status, _, err = export(capsys, run_dir / "student")
    assert status == 2 and "--out: required when SOURCE is a student folder" in err
    status, _, err = export(capsys, run_dir / "student", "--out", tmp_path / "exp", "--max_seq_length", 12)
    assert status == 0, err
    assert manifest(tmp_path / "exp")["task"]["name"] == "sst2"
    assert manifest(tmp_path / "exp")["task"]["max_seq_length"] == 12  # the flag overrides the run config


def test_a_lone_student_folder_needs_the_task_from_flags(tmp_path, capsys):
    student = save_student(tmp_path / "lone", num_labels=3)
    status, _, err = export(capsys, student, "--out", tmp_path / "exp")
    assert status == 2 and "no run config beside it" in err and "--task NAME" in err
    assert not (tmp_path / "exp").exists()
    status, _, err = export(capsys, student, "--out", tmp_path / "exp", "--task", "mnli", "--max_seq_length", 32)
    assert status == 0, err
    task = manifest(tmp_path / "exp")["task"]
    assert task["labels"] == ["contradiction", "entailment", "neutral"] and task["max_seq_length"] == 32
    assert task["text_fields"] == ["sentence1", "sentence2"]
    status, _, err = export(capsys, student, "--out", tmp_path / "custom", "--labels", "billing,refund,other",
                            "--text_columns", "body")
    assert status == 0, err
    task = manifest(tmp_path / "custom")["task"]
    assert (task["name"], task["labels"], task["text_fields"], task["max_seq_length"]) == \
        ("custom", ["billing", "refund", "other"], ["body"], 128)
    status, _, err = export(capsys, student, "--out", tmp_path / "x", "--task", "mnli", "--labels", "a,b,c")
    assert status == 2 and "--labels: task 'mnli' has the classes" in err


def test_classes_taken_from_the_data_come_from_the_students_config(tmp_path, capsys):
    run = write_run_config(tmp_path / "custom-run", {"task": "custom", "train_file": "train.csv",
                                                     "dev_file": "dev.csv", "text_columns": ["body"]})
    save_student(run / "student", num_labels=3, id2label=["billing", "other", "refund"])
    status, _, err = export(capsys, run)
    assert status == 0, err
    task = manifest(run / "student_packed")["task"]
    assert task["labels"] == ["billing", "other", "refund"] and task["text_fields"] == ["body"]
    assert task["primary_metric"] == "macro_f1"


def test_a_foreign_out_folder_is_never_touched(run_dir, tmp_path, capsys):
    foreign = tmp_path / "mine"
    (foreign / "sub").mkdir(parents=True)
    (foreign / "notes.txt").write_text("my notes")
    (foreign / "sub" / "data.bin").write_bytes(b"\x00\x01")
    (foreign / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    before = tree(foreign)
    for extra in ([], ["--overwrite"]):
        status, out, err = export(capsys, run_dir, "--out", foreign, *extra)
        assert status == 2 and out == ""
        assert "output folder error: --out:" in err and "holds no ds-kdqat export" in err
        assert tree(foreign) == before
    assert sorted(os.listdir(tmp_path)) == ["mine"]  # no temporary sibling either
    (tmp_path / "afile").write_text("x")
    status, _, err = export(capsys, run_dir, "--out", tmp_path / "afile")
    assert status == 2 and "is a file" in err and (tmp_path / "afile").read_text() == "x"


def test_an_empty_out_folder_is_used(run_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert export(capsys, run_dir, "--out", tmp_path / "empty")[0] == 0
    assert manifest(tmp_path / "empty")["format"] == "ds-kdqat-packed"


def test_onnx_without_its_packages_says_what_to_install_and_writes_nothing(run_dir, tmp_path, capsys,
                                                                            monkeypatch):
    monkeypatch.setitem(sys.modules, "ds_kdqat.deploy.onnx_export", None)  # import fails like a missing package
    status, _, err = export(capsys, run_dir, "--out", tmp_path / "exp", "--onnx")
    assert status == 2 and "pip install 'ds-kdqat[deploy]'" in err
    assert not (tmp_path / "exp").exists()


def test_onnx_export_is_called_on_the_new_export_and_stale_onnx_files_go(run_dir, tmp_path, capsys, monkeypatch):
    import types

    calls = []

    def fake_export_onnx(folder):
        calls.append(sorted(os.listdir(folder)))
        (folder / "model.onnx").write_bytes(b"onnx")
        return folder / "model.onnx"

    monkeypatch.setitem(sys.modules, "ds_kdqat.deploy.onnx_export",
                        types.SimpleNamespace(export_onnx=fake_export_onnx))
    out = tmp_path / "exp"
    status, stdout, err = export(capsys, run_dir, "--out", out, "--onnx")
    assert status == 0, err
    assert "model.onnx" not in calls[0] and "manifest.json" in calls[0]
    assert stdout.splitlines()[-2:] == [str(out / "model.onnx"), str(out)]
    (out / "README.txt").write_text("a note of the user's")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status, _, err = export(capsys, run_dir, "--out", out, "--overwrite")  # no --onnx: the old one is stale
    assert status == 0, err
    assert not (out / "model.onnx").exists() and (out / "README.txt").read_text() == "a note of the user's"
    kept = [str(w.message) for w in caught if "kept" in str(w.message)]
    assert len(kept) == 1 and "README.txt" in kept[0] and "model.onnx" not in kept[0]


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "neither a run folder"),
    (lambda p: None, "no such folder"),
    (lambda p: write_run_config(p, {"task": "sst2", "data_dir": "d"}), "without a trained student"),
])
def test_bad_sources_are_config_errors(tmp_path, capsys, make, message):
    make(tmp_path / "src")
    status, _, err = export(capsys, tmp_path / "src", "--out", tmp_path / "exp")
    assert status == 2 and message in err
