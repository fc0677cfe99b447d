"""Analyse a teacher, its quantized-before-QAT copy and a KD-QAT student on a data split; plot training curves.

    ds-kdqat analyze --teacher OUT/teacher --student OUT/student --task rt_polarity --split dev \\
        --output_dir OUT/analysis
    ds-kdqat analyze --teacher OUT/teacher --text_file sentences.txt --output_dir A --set hessian.enabled=false
    ds-kdqat analyze --run_dir runs/ti_gradual --run_dir runs/ternarybert --output_dir A   # curves only

Metrics (see ds_kdqat/analysis): cover length ratio and ranking loss per head, Hessian top eigenvalues,
layer-wise teacher–student MSE, per-token min–max of the attention output, SA-GEN/SA-PROP distances,
attention-map heatmaps; figures as PNG, numbers as CSV/JSON. Analysis options come from ``--config``
(JSON/YAML with the fields of AnalysisConfig) and ``--set key=value`` (e.g. ``--set cover_top_k=3``).
Exit status 2 for bad arguments, config, model folders or data, as for train.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..errors import ConfigError

DESCRIPTION = __doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", help="fine-tuned teacher directory (HF format, with tokenizer)")
    parser.add_argument("--student", help="student directory (latent fp32 weights + kdqat_quant.json)")
    parser.add_argument("--quant_config", help="QuantConfig JSON (default: <student>/kdqat_quant.json, else TernaryBERT)")
    parser.add_argument("--no_quantized", action="store_true", help="skip the quantized-before-QAT model")
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--task", help="a ds_kdqat.data task name, e.g. rt_polarity")
    data.add_argument("--text_file", help="plain text, one sentence per line")
    parser.add_argument("--data_dir", help="the task's GLUE-format folder (see kdqat.data.data_dir)")
    parser.add_argument("--split", default="dev", help="the task split to analyse (default: dev)")
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--run_dir", action="append", default=[], help="a run folder with log.csv (repeatable)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--config", help="analysis options, JSON or YAML (fields of AnalysisConfig)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override an analysis option")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda when available)")


def load_analysis_config(path, overrides):
    """The :class:`~ds_kdqat.analysis.compare.AnalysisConfig` of ``--config`` and ``--set`` (ConfigError if bad)."""
    from ..analysis.compare import AnalysisConfig
    from ..configtools import apply_overrides, from_dict

    data = {}
    if path:
        text = Path(path).read_text(encoding="utf-8")
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as error:
                raise ConfigError(f"{path}:{error.lineno}", f"not valid JSON: {error.msg}") from None
    return from_dict(AnalysisConfig, apply_overrides(data, overrides), "analysis")


def check_arguments(args: argparse.Namespace) -> None:
    """ConfigError naming the flag when the arguments ask for nothing to analyse, or for models without data."""
    if not args.teacher and not args.run_dir:
        raise ConfigError("--teacher/--run_dir", "give --teacher (model analysis) and/or --run_dir (training curves)")
    if args.teacher and not (args.task or args.text_file):
        raise ConfigError("--teacher", "needs data: --task NAME [--data_dir DIR] [--split S] or --text_file FILE")


def run_models(args, config, out):
    """Analyse the models on the batches of ``--task``/``--text_file``; the files written, by name."""
    import torch
    from transformers import AutoTokenizer

    from ..analysis.compare import analyze
    from ..analysis.inputs import load_models, read_text_file, task_batches, text_batches
    from ..analysis.report import write_analysis

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = AutoTokenizer.from_pretrained(args.teacher, local_files_only=True)
    if args.task:
        batches = task_batches(args.task, args.split, tokenizer, config.batch_size, args.max_seq_length,
                               args.data_dir, config.max_examples)
        source = {"task": args.task, "split": args.split}
    else:
        sentences = read_text_file(args.text_file)[: config.max_examples]
        batches = text_batches(sentences, tokenizer, config.batch_size, args.max_seq_length)
        source = {"text_file": os.path.abspath(args.text_file)}
    models = load_models(args.teacher, args.student, args.quant_config, include_quantized=not args.no_quantized)
    if len(models) < 2:
        raise ConfigError("--student", "nothing to compare with the teacher: give --student or drop --no_quantized")
    special_id = None
    if config.special_token is not None:
        special_id = tokenizer.convert_tokens_to_ids(config.special_token)
        if special_id is None or special_id == tokenizer.unk_token_id:
            raise ConfigError("analysis.special_token", f"{config.special_token!r} is not in the tokenizer's vocabulary")
    result = analyze(models, batches, config, special_id, tokenizer.convert_ids_to_tokens, device)
    extra = {"teacher": os.path.abspath(args.teacher), "student": args.student and os.path.abspath(args.student),
             "models": list(models), **source}
    return write_analysis(result, out, config.range_layers, extra)


def run_curves(run_dirs, out):
    """Plot and tabulate the log.csv of each run folder; the files written, by name."""
    from ..analysis.curves import read_log
    from ..analysis.report import write_curves

    labels = [Path(d).resolve().name for d in run_dirs]
    if len(set(labels)) < len(labels):
        labels = [str(Path(d)) for d in run_dirs]
    logs = {label: read_log(Path(d) / "log.csv") for label, d in zip(labels, run_dirs)}
    return write_curves(logs, out)


def run(args: argparse.Namespace) -> int:
    from ..models.paths import check_model_path

    check_arguments(args)
    out = Path(args.output_dir)
    config = load_analysis_config(args.config, args.set)
    for flag in ("teacher", "student"):
        if getattr(args, flag):
            check_model_path(getattr(args, flag), f"--{flag}", local_files_only=True)
    written = {}
    if args.teacher:
        written.update(run_models(args, config, out))
    if args.run_dir:
        written.update(run_curves(args.run_dir, out))
    for name in sorted(written):
        print(written[name])
    return 0
