"""The self-contained exported student: one folder that :func:`ds_kdqat.load_student` turns into a ready model.

Layout (a packed export, :mod:`ds_kdqat.quant.export`, plus what rebuilds the model without training files)::

    config.json            the HF model config (architecture, sizes, id2label)
    tokenizer files        tokenizer.json, vocab.txt, … (text models) or preprocessor_config.json (image models)
    weights.safetensors    packed codes + scales of the quantized weights, the other tensors as they are
    manifest.json          format/version, quant config, one entry per quantized weight, and:
                           "task":  name, kind, labels, text_fields, label_field, max_seq_length, metrics,
                                    primary_metric, input_kind, token_type_ids, and for extractive QA
                                    "qa": the window and decoding settings (:data:`QA_MANIFEST_KEYS`)
                           "model": family, architecture (the class to build), num_parameters
                           "files": size and SHA-256 of every file above, checked on load

The folder is written to a hidden sibling and moved into place (:func:`ds_kdqat.fileio.replace_dir`), so a
reader sees the old export or the whole new one.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Any, Optional, Union

from torch import nn

from ds_kdqat.configtools import is_finite_number, is_int
from ds_kdqat.errors import DataError
from ds_kdqat.fileio import replace_dir, temp_dir
from ds_kdqat.quant.export import SizeReport, TernaryPacking, export_packed, read_manifest

TASK_KINDS = ("classification", "regression", "qa", "image_classification")
#: The keys of a QA export's ``task.qa`` entry: the :class:`~ds_kdqat.data.qa.QASettings` the student was trained
#: with (``max_seq_length`` is ``task.max_seq_length``). Optional: an export without them (written before they
#: were recorded) is read with the QASettings defaults (:func:`qa_settings_of`).
QA_MANIFEST_KEYS = ("version", "doc_stride", "max_query_length", "max_answer_length", "null_score_diff_threshold")
_QA_SPECIAL_TOKENS = 3  # [CLS] question [SEP] context [SEP]

# What a saved student folder may hold besides its weights that the exported model needs to read its input.
PREPROCESSING_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model",
    "preprocessor_config.json", "chat_template.jinja",
)


def task_description(spec: Any, max_seq_length: Optional[int], input_kind: str = "tokens",
                     token_type_ids: bool = True, qa: Optional[Any] = None) -> dict:
    """The manifest's ``task`` entry from a :class:`~ds_kdqat.data.tasks.TaskSpec`; ``qa``: the
    :class:`~ds_kdqat.data.qa.QASettings` of a QA task, recorded as ``task.qa`` (:data:`QA_MANIFEST_KEYS`)."""
    if spec.kind == "qa":
        kind = "qa"
    elif spec.kind == "image_classification":
        kind = "image_classification"
    else:
        kind = "regression" if spec.is_regression else "classification"
    task = {"name": spec.name, "kind": kind, "labels": list(spec.labels), "text_fields": list(spec.text_fields),
            "label_field": spec.label_field, "max_seq_length": max_seq_length, "metrics": list(spec.metrics),
            "primary_metric": spec.primary_metric, "input_kind": input_kind, "token_type_ids": bool(token_type_ids)}
    if qa is not None:
        if kind != "qa":
            raise ValueError(f"QA settings given for the {kind} task {spec.name!r}")
        task["qa"] = {key: getattr(qa, key) for key in QA_MANIFEST_KEYS}
    return task


def check_task(task: Any, source: str) -> dict:
    """Validate a manifest's ``task`` entry (a :class:`~ds_kdqat.errors.DataError` names what is wrong)."""
    if not isinstance(task, dict):
        raise DataError(source, "no 'task' entry: this export predates self-contained exports; export the "
                        "student folder again with `ds-kdqat export`")
    for key in ("name", "kind", "labels", "text_fields", "input_kind"):
        if key not in task:
            raise DataError(source, f"task: no {key!r} entry")
    if task["kind"] not in TASK_KINDS:
        raise DataError(source, f"task.kind: got {task['kind']!r}, expected one of {list(TASK_KINDS)}")
    if task["kind"] in ("classification", "image_classification") and not task["labels"]:
        raise DataError(source, "task.labels: a classifier export needs its label names")
    if "qa" in task:
        if task["kind"] != "qa":
            raise DataError(source, f"task.qa: only for a 'qa' export; this one is {task['kind']!r}")
        qa_settings_of(task, source)
    return task


def qa_settings_of(task: dict, source: str) -> tuple[Any, list[str]]:
    """``(QASettings, keys that were not recorded)`` of a QA export's ``task`` entry: ``task.qa``'s keys
    (:data:`QA_MANIFEST_KEYS`) and ``task.max_seq_length``; a key not recorded takes the
    :class:`~ds_kdqat.data.qa.QASettings` default. A DataError names ``source`` and the manifest key
    (``task.qa.doc_stride``) of a bad value."""
    from ds_kdqat.data.qa import QASettings

    recorded = task.get("qa", {})
    if not isinstance(recorded, dict):
        raise DataError(source, f"task.qa: expected an object of QA settings, got {type(recorded).__name__}")
    defaults = QASettings()
    values, missing = {}, []
    for key in QA_MANIFEST_KEYS:
        if recorded.get(key) is None:
            missing.append(f"task.qa.{key}")
            continue
        _check_qa_value(key, recorded[key], source)
        values[key] = recorded[key]
    length = task.get("max_seq_length")
    if length is None:
        missing.append("task.max_seq_length")
    elif not is_int(length) or length < 1:
        raise DataError(source, f"task.max_seq_length: expected an integer >= 1, got {length!r}")
    settings = QASettings(max_seq_length=defaults.max_seq_length if length is None else int(length), **values)
    _check_qa_windows(settings, source, missing)
    return settings, missing


def _check_qa_value(key: str, value: Any, source: str) -> None:
    if key == "version":
        if not is_int(value) or value not in (1, 2):
            raise DataError(source, f"task.qa.version: got {value!r}, expected 1 (SQuAD v1.1) or 2 (SQuAD v2.0)")
    elif key == "null_score_diff_threshold":
        if not is_finite_number(value):
            raise DataError(source, f"task.qa.{key}: expected a finite number, got {value!r}")
    elif not is_int(value) or value < 1:
        raise DataError(source, f"task.qa.{key}: expected an integer >= 1, got {value!r}")


def _check_qa_windows(settings: Any, source: str, missing: list[str]) -> None:
    """The windows must leave room for context tokens and overlap by less than that room (``missing``: the keys
    that took their default, named in the error)."""
    room = settings.max_seq_length - settings.max_query_length - _QA_SPECIAL_TOKENS
    hint = (f" (not recorded, so defaults: {', '.join(missing)}; export the student again with `ds-kdqat export` "
            "from its run folder to record the settings it was trained with)") if missing else ""
    if room < 1:
        raise DataError(source, f"task.qa.max_query_length: {settings.max_query_length} leaves no context token "
                                f"in a window of max_seq_length {settings.max_seq_length}{hint}")
    if settings.doc_stride >= room:
        raise DataError(source, f"task.qa.doc_stride: {settings.doc_stride} must be below the context room of a "
                                f"window, max_seq_length - max_query_length - 3 = {room}{hint}")


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def export_student(model: nn.Module, out_dir: Union[str, os.PathLike], *, task: dict,
                   preprocessing: Optional[Any] = None, source_folder: Optional[Union[str, os.PathLike]] = None,
                   ternary_packing: TernaryPacking = "2bit") -> Optional[SizeReport]:
    """Write the self-contained export of quantized ``model`` (see the module docstring) to ``out_dir``.

    ``task``: :func:`task_description`. The tokenizer (or image processor) comes from ``preprocessing`` (an
    object with ``save_pretrained``) or is copied from ``source_folder`` (a saved student or teacher folder).

    A model partitioned by ZeRO-3 (a DeepSpeed engine or its module, parameters offloaded to the host or not) is
    exported from its gathered parameters (:func:`ds_kdqat.training.zero.gathered`), nothing read from disk: then
    the call is collective, every rank of the group makes it, and rank 0 alone writes ``out_dir`` and returns the
    :class:`SizeReport` (the other ranks return None).
    """
    from ds_kdqat.training.zero import gathered, is_partitioned

    check_task(task, "task")
    module = getattr(model, "module", model)
    partitioned = is_partitioned(module)
    with gathered(module):  # every rank at the same point, before any file is touched
        if partitioned and _rank() != 0:
            return None
        return _write_export(module, os.fspath(out_dir), task, preprocessing, source_folder, ternary_packing)


def _write_export(module: nn.Module, out: str, task: dict, preprocessing: Optional[Any],
                  source_folder: Optional[Union[str, os.PathLike]], ternary_packing: TernaryPacking) -> SizeReport:
    """:func:`export_student` of a whole (or gathered) ``module``."""
    from ds_kdqat.models.families import adapter_for

    tmp = temp_dir(out)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        config = copy.deepcopy(module.config)  # the caller's model keeps its own
        config.architectures = [type(module).__name__]
        if task["labels"]:
            config.id2label = dict(enumerate(task["labels"]))
            config.label2id = {label: i for i, label in enumerate(task["labels"])}
        config.save_pretrained(tmp)
        if preprocessing is not None:
            preprocessing.save_pretrained(tmp)
        elif source_folder is not None:
            for name in PREPROCESSING_FILES:
                if os.path.isfile(os.path.join(source_folder, name)):
                    shutil.copy2(os.path.join(source_folder, name), os.path.join(tmp, name))
        described = {"family": adapter_for(module).family, "architecture": type(module).__name__,
                     "num_parameters": sum(p.numel() for p in module.parameters())}
        report = export_packed(module, tmp, ternary_packing=ternary_packing, extra={"task": task, "model": described})
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def read_export(folder: Union[str, os.PathLike]) -> dict:
    """The manifest of a self-contained export, its ``task`` and ``model`` entries checked."""
    path = Path(folder)
    if not path.is_dir():
        raise DataError(str(path), "no such folder (expected an exported student: manifest.json, config.json, "
                        "weights.safetensors)")
    manifest = read_manifest(path)
    source = str(path / "manifest.json")
    check_task(manifest.get("task"), source)
    model = manifest.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("architecture"), str):
        raise DataError(source, "model: no 'architecture' entry")
    if not (path / "config.json").is_file():
        raise DataError(str(path / "config.json"), "missing; a self-contained export holds the model config")
    return manifest
