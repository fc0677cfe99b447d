"""Write the self-contained export of a trained student (what ``ds-kdqat predict`` and ``ds_kdqat.load_student``
read), optionally with its ONNX model.

    ds-kdqat export outputs/ternary                       # -> outputs/ternary/student_packed (needs --overwrite
                                                          #    when an export is already there)
    ds-kdqat export outputs/ternary/student --out /tmp/exp [--onnx] [--ternary_packing base3]
    ds-kdqat export saved_student --task sst2 --max_seq_length 64 --out exp
    ds-kdqat export saved_student --labels billing,refund,other --text_columns text --out exp

SOURCE is a run folder (its config.json is the run config, student/ the trained student) or a saved student
folder (HF weights + kdqat_quant.json). The task (labels, text fields, max_seq_length, metric) comes from the run
config: the run folder's, or for a student folder its parent's when that is a run folder. Otherwise, or to
override it: --task NAME (a registered task), --labels a,b,... (a classifier's classes; with no --task, a custom
classification task reading --text_columns, default "text"), --task_type regression, --max_seq_length N.
Classes the run took from its data are read from the student's config (id2label). A question-answering export
(--task squad) records the window and decoding settings predict uses: the run config's, or --qa_version,
--doc_stride, --max_query_length, --max_answer_length, --null_score_diff_threshold.

The export folder: --out, default RUN/student_packed for a run folder (required for a student folder). It is
written beside and moved into place; an existing export there is replaced only with --overwrite, and a
non-empty folder that is not a ds-kdqat export is never touched. --onnx also writes model.onnx into it
(needs pip install 'ds-kdqat[deploy]'). Prints the size report and the export's path.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Optional

from ..errors import ConfigError, OutputFolderError

DESCRIPTION = __doc__
PACKINGS = ("2bit", "base3")
ONNX_PREFIX = "model.onnx"  # model.onnx and its external data files, written by ds_kdqat.deploy.onnx_export
DEPLOY_HINT = "pip install 'ds-kdqat[deploy]'"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SOURCE", help="a run folder (config.json + student/) or a saved student "
                                                         "folder (with kdqat_quant.json)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="the export folder (default for a run folder: RUN/student_packed)")
    parser.add_argument("--onnx", action="store_true", help=f"also write model.onnx ({DEPLOY_HINT})")
    parser.add_argument("--ternary_packing", default="2bit", choices=PACKINGS,
                        help="ternary codes as 2 bits each (default) or 5 per byte (base3)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing ds-kdqat export at --out")
    task = parser.add_argument_group("the task, when no run config says it (or to override it)")
    task.add_argument("--task", default=None, help="a registered task name (e.g. sst2, rt_polarity, mnli)")
    task.add_argument("--labels", default=None, help="comma-separated class names, in class-index order")
    task.add_argument("--task_type", default=None, choices=("classification", "regression"),
                      help="a custom task's kind (default classification)")
    task.add_argument("--text_columns", nargs="+", default=None, metavar="COLUMN",
                      help="a custom task's text column(s) (default: text)")
    task.add_argument("--max_seq_length", type=int, default=None, help="tokens per example the export reads")
    qa = parser.add_argument_group("question answering (task squad): the window and decoding settings predict uses, "
                                   "recorded in the export (default: the run config's, else the QA defaults)")
    for key, (kind, text) in QA_FLAGS.items():
        qa.add_argument(qa_flag(key), type=kind, default=None, dest=f"qa_{key}", help=text)


# --------------------------------------------------------------------------------------------- source


def is_student_folder(folder: Path) -> bool:
    from ..quant.student_files import QUANT_CONFIG_FILE

    return (folder / QUANT_CONFIG_FILE).is_file()


def read_run_config(folder: Path):
    """The :class:`~ds_kdqat.config.RunConfig` of a run folder's ``config.json``; None when the folder has no
    run config (no config.json, or one without a ``kdqat`` section such as an HF model config)."""
    from ..config import parse_config
    from ..errors import DataError

    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}", f"invalid JSON: {error.msg}") from None
    if not isinstance(data, dict) or "kdqat" not in data:
        return None
    return parse_config(data, source=str(path))


def locate(source: str) -> tuple[Path, Optional[Path]]:
    """``(student folder, run folder or None)`` of SOURCE; a ConfigError saying what SOURCE should be."""
    from ..fileio import saved_dir

    path = Path(source)
    if not path.is_dir():
        raise ConfigError("SOURCE", f"{source}: no such folder (expected a run folder or a saved student folder)")
    if is_student_folder(path):
        parent = path.resolve().parent
        return path, parent if read_run_config(parent) is not None else None
    student = Path(saved_dir(str(path / "student")))
    if read_run_config(path) is not None:
        if not is_student_folder(student):
            raise ConfigError("SOURCE", f"{source} is a run folder without a trained student ({path / 'student'} "
                                        "has no kdqat_quant.json): has the training finished?")
        return student, path
    raise ConfigError("SOURCE", f"{source} is neither a run folder (config.json with a 'kdqat' section, and "
                                "student/) nor a saved student folder (kdqat_quant.json)")


# --------------------------------------------------------------------------------------------- task


def saved_class_names(student: Path) -> list[str]:
    """The class names of a saved student's config (``id2label`` in index order); [] when they are HF's
    placeholders (``LABEL_0``, …)."""
    config = json.loads((student / "config.json").read_text(encoding="utf-8"))
    id2label = config.get("id2label") or {}
    names = [str(id2label[key]) for key in sorted(id2label, key=int)]
    return [] if all(name == f"LABEL_{i}" for i, name in enumerate(names)) else names


def custom_spec(args: argparse.Namespace):
    """A described task from the flags: ``--labels`` (classification) or ``--task_type regression``."""
    from ..data.description import DEFAULT_METRICS
    from ..data.tasks import TaskSpec

    kind = args.task_type or "classification"
    labels = tuple(parse_labels(args.labels)) if args.labels else ()
    if kind == "regression" and labels:
        raise ConfigError("--labels", "a regression task has no classes")
    if kind == "classification" and not labels:
        raise ConfigError("--labels", "a custom classification task needs its class names: --labels a,b,...")
    metrics = DEFAULT_METRICS[kind]
    text_fields = tuple(args.text_columns or ("text",))
    if len(text_fields) not in (1, 2):
        raise ConfigError("--text_columns", f"expected one or two column names, got {list(text_fields)}")
    return TaskSpec(name="custom", text_fields=text_fields, label_field="label", labels=labels,
                    is_regression=kind == "regression", metrics=metrics, primary_metric=metrics[0])


def parse_labels(text: str) -> list[str]:
    labels = [label.strip() for label in text.split(",")]
    if len(labels) < 2 or not all(labels) or len(set(labels)) != len(labels):
        raise ConfigError("--labels", f"expected two or more distinct, non-empty class names, got {text!r}")
    return labels


def resolve_task(args: argparse.Namespace, run_config, student: Path):
    """``(TaskSpec with its labels, max_seq_length or None)``: from the flags, else from the run config."""
    from ..data.description import task_spec
    from ..data.tasks import get_task

    if args.task:
        spec = get_task(args.task, "--task")
    elif args.labels or args.task_type:
        spec = custom_spec(args)
    elif run_config is not None:
        spec = task_spec(run_config.kdqat.data)
    else:
        raise ConfigError("--task", f"{student} has no run config beside it (../config.json); name the task: --task "
                                    "NAME, or --labels a,b,... for a custom classifier (--task_type regression "
                                    "for a regression)")
    if args.labels and args.task:
        spec = with_flag_labels(spec, parse_labels(args.labels))
    if spec.labels_from_data:
        names = saved_class_names(student)
        if not names:
            raise ConfigError("--labels", f"task {spec.name!r} takes its classes from the data and {student}/"
                                          "config.json does not name them; give --labels a,b,...")
        spec = spec.with_labels(names)
    max_seq_length = args.max_seq_length
    if max_seq_length is None and run_config is not None:
        max_seq_length = run_config.kdqat.data.max_seq_length
    if max_seq_length is None:
        from ..data.config import DataConfig

        max_seq_length = DataConfig().max_seq_length
    if max_seq_length < 1:
        raise ConfigError("--max_seq_length", f"expected a positive integer, got {max_seq_length}")
    return spec, max_seq_length


QA_FLAGS = {
    "version": (int, "1 = SQuAD v1.1 (every question answered), 2 = v2.0 (unanswerable questions)"),
    "doc_stride": (int, "tokens shared by consecutive context windows"),
    "max_query_length": (int, "question tokens kept"),
    "max_answer_length": (int, "longest predicted answer, in tokens"),
    "null_score_diff_threshold": (float, 'v2.0: answer "" when the null score exceeds the best span\'s by more'),
}
"""The QA settings the export command takes as flags (:func:`qa_flag`), the keys of ``task.qa``."""


def qa_flag(key: str) -> str:
    return "--qa_version" if key == "version" else f"--{key}"


def recorded_qa_settings(spec, run_config, max_seq_length: int, args: Optional[argparse.Namespace] = None):
    """The QA settings to record in a QA export (``task.qa``): the run config's (``kdqat.data``; else the
    QASettings defaults), with the export's ``max_seq_length`` and the QA flags given in ``args``; None for
    another task, or without run config and flags (then ``predict`` falls back to the defaults and says so).
    QA flags for another task, or values out of range, are a ConfigError naming the flag."""
    import dataclasses
    import math

    from ..data.qa import QASettings
    from ..data.qa_config import check_qa_window, qa_settings

    given = {key: getattr(args, f"qa_{key}") for key in QA_FLAGS if getattr(args, f"qa_{key}", None) is not None}
    if not spec.is_qa:
        if given:
            raise ConfigError(qa_flag(next(iter(given))), f"only for a question-answering task (squad); the task is "
                                                          f"{spec.name!r}")
        return None
    if run_config is None and not given:
        return None
    for key, value in given.items():
        if key == "version" and value not in (1, 2):
            raise ConfigError(qa_flag(key), f"got {value}; allowed: 1 (SQuAD v1.1), 2 (SQuAD v2.0)")
        if QA_FLAGS[key][0] is int and key != "version" and value < 1:
            raise ConfigError(qa_flag(key), f"expected an integer >= 1, got {value}")
        if QA_FLAGS[key][0] is float and not math.isfinite(value):
            raise ConfigError(qa_flag(key), f"expected a finite number, got {value}")
    base = qa_settings(run_config.kdqat.data) if run_config is not None else QASettings()
    settings = dataclasses.replace(base, max_seq_length=max_seq_length, **given)
    check_qa_window(settings, qa_flag)
    return settings


def with_flag_labels(spec, labels: list[str]):
    """``spec`` with ``--labels``: the classes of a task that takes them from the data, or a check of a fixed
    list."""
    if spec.labels_from_data:
        return spec.with_labels(labels)
    if list(spec.labels) != labels:
        raise ConfigError("--labels", f"task {spec.name!r} has the classes {list(spec.labels)}; got {labels}")
    return spec


# --------------------------------------------------------------------------------------------- output


def default_out(args: argparse.Namespace, run_dir: Optional[Path], student: Path) -> Path:
    if args.out:
        return Path(args.out)
    if run_dir is not None and Path(args.source).resolve() == run_dir.resolve():
        return run_dir / "student_packed"
    raise ConfigError("--out", f"required when SOURCE is a student folder ({student}): where the export goes")


def is_export(folder: Path) -> bool:
    """Whether ``folder`` holds a ds-kdqat packed export (its manifest.json says format ds-kdqat-packed)."""
    from ..quant.export import FORMAT, MANIFEST_FILE

    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def check_out(out: Path, overwrite: bool, student: Path) -> None:
    """Refuse an ``out`` that must not be written: a file, a non-empty folder that is no ds-kdqat export, an
    export without --overwrite, or the student folder itself. Nothing is changed."""
    if out.exists() and not out.is_dir():
        raise OutputFolderError("--out", f"{out} is a file, not a folder")
    if out.resolve() == student.resolve():
        raise OutputFolderError("--out", f"{out} is the student folder itself; export elsewhere")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not is_export(out):
        raise OutputFolderError("--out", f"{out} is not empty and holds no ds-kdqat export (no manifest.json of "
                                         "format ds-kdqat-packed); refusing to replace it: choose another --out")
    if not overwrite:
        raise OutputFolderError("--out", f"{out} already holds an export; pass --overwrite to replace it")


def onnx_exporter():
    """:func:`ds_kdqat.deploy.onnx_export.export_onnx`; a ConfigError naming the extra to install."""
    try:
        from ..deploy.onnx_export import export_onnx
    except ImportError as error:
        raise ConfigError("--onnx", f"ONNX export needs packages that are not installed ({error}): {DEPLOY_HINT}") \
            from None
    return export_onnx


def drop_stale_onnx(out: Path) -> list[str]:
    """Remove ONNX files a previous export left in ``out`` (the folder swap keeps files the new export lacks);
    they were made from the old weights. Returns their names."""
    stale = sorted(p.name for p in out.iterdir() if p.name.startswith(ONNX_PREFIX) and p.is_file())
    for name in stale:
        (out / name).unlink()
    return stale


def without_onnx_names(message: str) -> Optional[str]:
    """A warning of the folder swap (``<folder>: kept a, b (not written by ds-kdqat) …``) without the old ONNX
    files that :func:`drop_stale_onnx` removes; None when nothing else is left. Other warnings pass as they are."""
    match = re.search(r"kept (.*) \(not written by ds-kdqat\)", message)
    if match is None:
        return message
    names = [name for name in match.group(1).split(", ") if not name.startswith(ONNX_PREFIX)]
    if not names:
        return None
    return message[:match.start(1)] + ", ".join(names) + message[match.end(1):]


def tokenizer_source(student: Path, run_dir: Optional[Path]) -> Path:
    """Where the preprocessing files come from: the student folder, else the run's teacher/ folder."""
    from ..deploy.artifact import PREPROCESSING_FILES

    for folder in (student, *(() if run_dir is None else (run_dir / "teacher",))):
        if any((folder / name).is_file() for name in PREPROCESSING_FILES):
            return folder
    raise ConfigError("SOURCE", f"{student} holds no tokenizer or image processor files "
                                f"({', '.join(PREPROCESSING_FILES[:5])}, …); the export could not read its input")


def run(args: argparse.Namespace) -> int:
    import warnings

    student, run_dir = locate(args.source)
    run_config = read_run_config(run_dir) if run_dir is not None else None
    spec, max_seq_length = resolve_task(args, run_config, student)
    qa = recorded_qa_settings(spec, run_config, max_seq_length, args)
    out = default_out(args, run_dir, student)
    # a run's own student_packed/ is the training job's export of the same student: re-exporting it (to add
    # ONNX, or another packing) needs no --overwrite
    check_out(out, args.overwrite or not args.out, student)
    export_onnx = onnx_exporter() if args.onnx else None
    preprocessing = tokenizer_source(student, run_dir)

    from ..deploy.artifact import export_student, task_description
    from ..models.families import adapter_for
    from ..pipeline import load_student

    model = load_student(str(student), spec).eval()
    adapter = adapter_for(model)
    pixels = adapter.input_kind == "pixels"
    task = task_description(spec, None if pixels else max_seq_length, adapter.input_kind, adapter.token_type_ids,
                            qa=qa)
    had_onnx = out.is_dir() and any(p.name.startswith(ONNX_PREFIX) for p in out.iterdir())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = export_student(model, out, task=task, source_folder=preprocessing,
                                ternary_packing=args.ternary_packing)
    for warning in caught:
        message = without_onnx_names(str(warning.message))
        if message:
            warnings.warn(message, warning.category, stacklevel=2)
    if had_onnx:
        drop_stale_onnx(out)
    print(report.row())
    if export_onnx is not None:
        print(export_onnx(out))
    print(os.fspath(out))
    return 0
