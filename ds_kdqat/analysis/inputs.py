"""What ``run/analyze.py`` analyses: the three models and the batches of a data split.

* teacher: an HF sequence-classification checkpoint directory (with its tokenizer);
* quantized: a copy of the teacher converted by ``quantize_model`` (quantized before QAT);
* student: the trained student's latent fp32 weights (HF directory) converted with the same QuantConfig,
  read from ``--quant_config`` or else ``<student>/kdqat_quant.json``.

Data: a task of :mod:`ds_kdqat.data` (``load_split`` + ``encode``), or a plain text file with one sentence
per line (no labels: the Hessian then uses the teacher's predictions as labels).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..errors import ConfigError, DataError
from ..quant.student_files import QUANT_CONFIG_FILE, quantize_saved_student


def load_quant_config(path: str | Path):
    """A QuantConfig from a JSON file holding the ``kdqat.quant`` object, or a whole ds_config with one."""
    from ..quant import quant_config_from_dict

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(str(path), f"cannot read the quant config: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}:{error.lineno}", f"not valid JSON: {error.msg}") from None
    if isinstance(data, dict) and "kdqat" in data:
        return quant_config_from_dict((data["kdqat"] or {}).get("quant", {}), "kdqat.quant")
    return quant_config_from_dict(data, "kdqat.quant")


def load_classifier(path: str | Path) -> nn.Module:
    """A saved task model (teacher or student folder, with its head), built by its family adapter, in eval mode."""
    from transformers import AutoConfig

    from ..models.families import adapter_for_config

    if not Path(path).is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    model = adapter_for_config(config).load_task_model(str(path), num_labels=config.num_labels,
                                                       problem_type=config.problem_type, local_files_only=True)
    return model.eval()


def load_models(teacher_dir: str | Path, student_dir: Optional[str | Path] = None,
                quant_config_path: Optional[str | Path] = None, include_quantized: bool = True) -> dict[str, nn.Module]:
    """``{"teacher", "quantized", "student"}`` models (student only when ``student_dir`` is given)."""
    from ..quant import QuantConfig, quantize_model

    if quant_config_path is None and student_dir is not None and (Path(student_dir) / QUANT_CONFIG_FILE).is_file():
        quant_config_path = Path(student_dir) / QUANT_CONFIG_FILE
    quant_config = load_quant_config(quant_config_path) if quant_config_path is not None else QuantConfig()
    teacher = load_classifier(teacher_dir)
    models = {"teacher": teacher}
    if include_quantized:
        quantized = copy.deepcopy(teacher)
        quantize_model(quantized, quant_config)
        models["quantized"] = quantized.eval()
    if student_dir is not None:
        student = quantize_saved_student(load_classifier(student_dir), str(student_dir), quant_config)
        models["student"] = student.eval()
    return models


def read_text_file(path: str | Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file, one sentence each."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(str(path), f"cannot read: {error.strerror}") from None
    sentences = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError as error:
            raise DataError(f"{path}:{number}", f"not UTF-8 ({error.reason})") from None
        if text:
            sentences.append(text)
    if not sentences:
        raise DataError(str(path), "no sentences (the file is empty)")
    return sentences


def text_batches(sentences: list[str], tokenizer, batch_size: int, max_length: int) -> list[dict[str, torch.Tensor]]:
    batches = []
    for start in range(0, len(sentences), batch_size):
        encoded = tokenizer(sentences[start: start + batch_size], truncation=True, max_length=max_length,
                            padding=True, return_tensors="pt")
        batches.append({k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
    return batches


def task_batches(task: str, split: str, tokenizer, batch_size: int, max_length: int,
                 data_dir: Optional[str] = None, max_examples: Optional[int] = None) -> list[dict[str, torch.Tensor]]:
    """Batches (in file order, right-padded) of ``split`` of a :mod:`ds_kdqat.data` task, with labels."""
    from ..data import DataConfig, encode, get_task, load_split

    config = DataConfig(task=task, data_dir=data_dir, max_seq_length=max_length)
    config.validate("data")
    spec = get_task(task)
    examples = load_split(config, split)
    if max_examples is not None:
        examples = examples[:max_examples]
    dataset = encode(examples, tokenizer, spec, max_length)
    return [dataset.collate_fn([dataset[i] for i in range(start, min(len(dataset), start + batch_size))])
            for start in range(0, len(dataset), batch_size)]
