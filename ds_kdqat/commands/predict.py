"""Predict with an exported student: one record per input example, in input order.

    ds-kdqat predict OUT/student_packed --input dev.tsv --output predictions.jsonl
    echo "a great , moving film" | ds-kdqat predict OUT/student_packed
    ds-kdqat predict EXPORT --input pairs.txt --format lines          # text_a<TAB>text_b per line
    ds-kdqat predict EXPORT --input dev.csv --eval [--output p.tsv --output_format tsv]
    ds-kdqat predict QA_EXPORT --input dev-v2.0.json --eval --output predictions.json --output_format squad

Input (--input FILE, or - for stdin, the default), by --format:

* tsv / csv / jsonl / parquet (auto: by the file's extension): a table as the task readers read it
  (ds_kdqat/data/files.py: a header line for TSV/CSV, one object per line for JSON Lines). The texts are read
  from the export's task text fields (e.g. "sentence", or "sentence1" and "sentence2") or from --text_columns;
  image tasks read an image path per row (relative paths: from the input file's folder). A header-less TSV of a
  registered task whose files have no header (CoLA) is read with that task's columns.
* lines (auto: stdin, or a file of another extension): one example per line; a TAB separates the two texts
  of a pair task. Blank lines are errors, except at the end of the input.

Output (--output FILE, default stdout), one record per input example, in input order:

* jsonl: {"label": "1", "probabilities": {"0": 0.08, "1": 0.92}}, regression {"score": 3.1};
* tsv: a header line ("label", then "prob_<class>" per class; regression "score"), one row per example.

An output file is written whole or not at all (a temporary file renamed into place at the end); an existing
one is replaced only with --overwrite. --eval reads the gold label of each row too (the task's label column,
or --label_column) and prints the task's metrics as one JSON object on stdout, the primary metric first;
predictions are then written only when --output names a file.

Batches keep the input order and are padded to their longest example: the 8-bit activation quantizers use
per-batch statistics, so predictions depend on --batch_size (see ds_kdqat/deploy/predict.py); --batch_size 1
makes each prediction independent of its neighbours. Bad input is exit status 2 with file:line and what was
expected.

Extractive-QA exports (task kind "qa") take questions and write one answer per question:

* input, by --format: squad (auto: a .json file) is a SQuAD v1.1 / v2.0 JSON file ({"data": [{"paragraphs":
  [{"context", "qas": [{"id", "question", ...}]}]}]}; answers are read only with --eval, and then the file
  must be what training reads for the export's SQuAD version); jsonl (auto: .jsonl, and stdin) is one
  {"id": ..., "question": ..., "context": ...} object per line (with --eval also "answers": the gold answer
  texts, or SQuAD answer objects {"text", ...}; [] for an unanswerable v2.0 question).
* output, by --output_format: jsonl, {"id": ..., "answer": ..., "score": ...} per question in input order
  (answer "" = no answer; score: start + end logit of the span, or the no-answer score); squad, one JSON
  object {id: answer} (the official SQuAD predictions file).
* windows (max_seq_length, doc_stride, max_query_length), max_answer_length, the SQuAD version and
  null_score_diff_threshold are those the student was trained with (the export's manifest, task.qa);
  --batch_size counts windows. --eval prints SQuAD exact_match and f1 (f1 first) and, for a file with
  unanswerable questions, the HasAns_/NoAns_ figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

from ..errors import ConfigError, DataError

DESCRIPTION = __doc__
INPUT_FORMATS = ("auto", "tsv", "csv", "jsonl", "parquet", "lines", "squad")
OUTPUT_FORMATS = ("jsonl", "tsv", "squad")
QA_INPUT_FORMATS = ("squad", "jsonl")
QA_OUTPUT_FORMATS = ("jsonl", "squad")
BACKENDS = ("fakequant", "int8", "onnx")
WEIGHT_MODES = ("int8", "packed2")  # ds_kdqat.deploy.int_modules.WEIGHT_MODES (not imported: --help stays light)
STDIN = "-"
STDIN_NAME = "<stdin>"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("export_dir", metavar="EXPORT_DIR", help="an exported student (ds-kdqat export)")
    parser.add_argument("--input", default=STDIN, metavar="FILE", help="the examples; - for stdin (default)")
    parser.add_argument("--format", default="auto", choices=INPUT_FORMATS,
                        help="input format (default auto: by extension; stdin and other extensions: lines; QA "
                             "exports: squad for .json, else jsonl)")
    parser.add_argument("--text_columns", "--text_column", nargs="+", default=None, metavar="COLUMN",
                        help="the text column(s) of a table input (default: the export's task text fields)")
    parser.add_argument("--label_column", default=None,
                        help="with --eval: the gold label column (default: the export's task label column)")
    parser.add_argument("--output", default=None, metavar="FILE", help="where the predictions go (default stdout)")
    parser.add_argument("--output_format", default="jsonl", choices=OUTPUT_FORMATS,
                        help="jsonl (default), tsv (not for QA), squad (QA only: one {id: answer} JSON object)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    parser.add_argument("--backend", default="int8", choices=BACKENDS, help="how the export runs (default int8)")
    parser.add_argument("--weights", default="int8", choices=WEIGHT_MODES,
                        help="int8 backend: how its weight codes are held: int8 (one byte each, default) or packed2 "
                             "(ternary/binary codes packed 4 per byte and unpacked per linear before its GEMM: "
                             "a quarter of the weight memory, a little slower)")
    parser.add_argument("--compile", action="store_true",
                        help="int8 backend: run its element-wise work by torch.compile'd kernels (the same "
                             "predictions; the first batches compile them, which takes seconds and a C++ compiler)")
    parser.add_argument("--batch_size", type=int, default=32,
                        help="examples (QA: context windows) per forward pass (default 32)")
    parser.add_argument("--eval", action="store_true", help="the input is labelled: print the task's metrics")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar on stderr")


# --------------------------------------------------------------------------------------------- input


@dataclass
class InputRow:
    """One example read from the input: where (``file:line``), the example (a text, a pair of texts, an image
    path) and, with --eval, its gold label (a class name, or the score's text)."""

    where: str
    example: Any
    label: Optional[str] = None


def input_format(path: str, explicit: str) -> str:
    """The format of the input: ``explicit`` unless ``auto``; then by extension, ``lines`` for stdin or another
    extension."""
    from ..data.files import format_of

    if explicit != "auto":
        return explicit
    return "lines" if path == STDIN else (format_of(path) or "lines")


def read_input_bytes(path: str) -> tuple[str, bytes]:
    """``(name for errors, bytes)`` of the input file or stdin."""
    if path == STDIN:
        if sys.stdin.isatty():
            print("ds-kdqat predict: reading examples from stdin (end with Ctrl-D)", file=sys.stderr)
        return STDIN_NAME, sys.stdin.buffer.read()
    if not Path(path).is_file():
        raise FileNotFoundError(2, "no such file (--input)", path)
    return path, Path(path).read_bytes()


def read_lines(name: str, data: bytes, pair: bool) -> list[InputRow]:
    """``lines`` input: one example per line (``text_a<TAB>text_b`` for a pair task). A DataError names
    ``name:line`` for a line that is not UTF-8, is blank before the end, or has the wrong number of texts."""
    lines = data.split(b"\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise DataError(name, "no examples (expected one example per line)")
    rows = []
    for number, raw in enumerate(lines, start=1):
        where = f"{name}:{number}"
        try:
            line = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as error:
            raise DataError(where, f"not valid UTF-8 ({error.reason} at byte {error.start})") from None
        if number == 1:
            line = line.lstrip("\ufeff")
        rows.append(InputRow(where, _line_example(line, pair, where)))
    return rows


def _line_example(line: str, pair: bool, where: str) -> Any:
    if not line.strip():
        raise DataError(where, "blank line (every line is one example)")
    texts = line.split("\t")
    if pair:
        if len(texts) != 2 or not all(text.strip() for text in texts):
            raise DataError(where, f"expected two non-empty texts separated by one TAB (a pair task), found "
                                   f"{len(texts)} field(s)")
        return texts[0].strip(), texts[1].strip()
    if len(texts) != 1:
        raise DataError(where, "holds a TAB, but the task takes one text per example (a TAB separates the two "
                               "texts of a pair task); use --format tsv/csv for a table")
    return line.strip()


def read_table_input(name: str, data: Optional[bytes], fmt: str, task: dict, explicit_columns: bool):
    """The :class:`~ds_kdqat.data.files.Table` of a table input (a file, or stdin's bytes ``data``).

    A TSV of a registered header-less task (CoLA) whose first line is not a header is read with the task's
    columns (line numbers stay those of the file)."""
    from ..data import files

    if name == STDIN_NAME and fmt == "parquet":
        raise ConfigError("--input", "Parquet is read from a file, not from stdin")
    columns = None if explicit_columns or fmt != "tsv" else headerless_columns(task, name, data)
    if columns is not None:
        raw = data if data is not None else Path(name).read_bytes()
        table = files._read_delimited(name, ("\t".join(columns) + "\n").encode() + raw, "tsv")
        for record in table.records:
            record.line -= 1
    elif name == STDIN_NAME:
        if not data.strip():
            raise DataError(name, f"empty input (expected {fmt.upper()} rows)")
        table = files._read_jsonl(name, data) if fmt == "jsonl" else files._read_delimited(name, data, fmt)
    else:
        return files.read_table(name, fmt)
    if not table.records:
        raise DataError(name, "no rows after the header" if fmt in ("csv", "tsv") else "no rows")
    return table


def headerless_columns(task: dict, name: str, data: Optional[bytes]) -> Optional[list[str]]:
    """The registered task's columns when the TSV input is a file of a task whose files have no header (CoLA's
    train/dev) and its first line is data, not a header (it lacks the text columns, has the task's width)."""
    from ..data.tasks import TASKS

    spec = TASKS.get(task["name"])
    if spec is None or spec.has_header:
        return None
    if data is None:
        if not Path(name).is_file():
            return None
        with open(name, "rb") as handle:
            first = handle.readline()
    else:
        first = data.split(b"\n", 1)[0]
    fields = first.decode("utf-8", errors="replace").lstrip("\ufeff").rstrip("\r\n").split("\t")
    if any(field.strip() in spec.text_fields for field in fields) or len(fields) != len(spec.columns):
        return None
    return list(spec.columns)


def table_rows(table, text_columns: Sequence[str], label_column: Optional[str], task: dict,
               base: Path) -> list[InputRow]:
    """The examples (and gold labels when ``label_column`` is given) of a table's records; image paths are
    resolved against ``base`` (the input file's folder). A DataError names ``file:line`` for a bad row."""
    from ..data.files import has_column

    where = f"{table.path}:1" if table.format in ("csv", "tsv") else table.path
    wanted = [*text_columns, *([label_column] if label_column else [])]
    missing = [name for name in wanted if not has_column(table.columns, name)]
    if missing:
        kinds = ["label" if name == label_column else "text" for name in missing]
        named = ", ".join(f"{kind} column {name!r}" for kind, name in zip(kinds, missing))
        raise DataError(where, f"no {named}; the input has the columns {list(table.columns)} "
                               "(name them with --text_columns / --label_column)")
    image = task["kind"] == "image_classification"
    rows = []
    for record in table.records:
        source = f"{table.path}:{record.line}"
        if record.reason is not None:
            raise DataError(source, record.reason)
        texts = [_text(record.values, column, source) for column in text_columns]
        example: Any = texts[0] if len(texts) == 1 else tuple(texts)
        if image:
            example = str(base / example)  # an absolute path stays as it is
        label = _gold_label(record.values, label_column, task, source) if label_column else None
        rows.append(InputRow(source, example, label))
    return rows


def _text(values: dict, column: str, source: str) -> str:
    from ..data.files import lookup

    found, value = lookup(values, column)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if found and value is not None and not isinstance(value, str):
        raise DataError(source, f"column {column!r} holds {type(value).__name__}, not text")
    if not (value or "").strip():
        raise DataError(source, f"empty text in column {column!r}" if found else f"no value for column {column!r}")
    return value.strip()


def _gold_label(values: dict, column: str, task: dict, source: str) -> str:
    """The gold label of a row as text: a class name of the export (classification) or a finite number."""
    from ..data.custom import class_label_text
    from ..data.files import lookup

    found, value = lookup(values, column)
    if not found or value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(source, f"no label in column {column!r} (--eval needs a labelled input)")
    if task["kind"] == "regression":
        try:
            score = float(value)
        except (TypeError, ValueError):
            score = math.nan
        if isinstance(value, bool) or not math.isfinite(score):
            raise DataError(source, f"label {value!r} in column {column!r} is not a finite number (regression task)")
        return repr(score)
    label = class_label_text(value)
    if label not in task["labels"]:
        raise DataError(source, f"label {label!r} in column {column!r} is not a class of the export "
                                f"(classes: {list(task['labels'])})")
    return label


def read_inputs(args: argparse.Namespace, task: dict) -> list[InputRow]:
    """Every example of ``--input`` (with its gold label under --eval), in input order."""
    from ..deploy.predict import label_field

    fmt = input_format(args.input, args.format)
    pair = task["kind"] != "image_classification" and len(task["text_fields"]) == 2
    if fmt == "lines":
        if args.text_columns or args.label_column:
            raise ConfigError("--text_columns/--label_column", "only for table input (tsv, csv, jsonl, parquet); "
                                                               "lines input has no columns")
        if args.eval:
            raise ConfigError("--eval", "needs a labelled table (--format tsv, csv, jsonl or parquet), not lines")
        rows = read_lines(*read_input_bytes(args.input), pair)
        if task["kind"] == "image_classification":
            for row in rows:
                row.example = str(input_folder(args.input) / row.example)  # an absolute path stays as it is
        return rows
    fields = ["image"] if task["kind"] == "image_classification" else list(task["text_fields"])
    columns = list(args.text_columns or fields)
    if len(columns) != len(fields):
        raise ConfigError("--text_columns", f"the export's task takes {len(fields)} text(s) per example "
                                            f"({', '.join(fields)}); got {len(columns)} column(s) {columns}")
    name, data = read_input_bytes(args.input) if args.input == STDIN else (args.input, None)
    table = read_table_input(name, data, fmt, task, bool(args.text_columns))
    label_column = (args.label_column or label_field(task)) if args.eval else None
    return table_rows(table, columns, label_column, task, input_folder(args.input))


def input_folder(path: str) -> Path:
    """What relative image paths of the input are relative to: the input file's folder (stdin: the current one)."""
    return Path.cwd() if path == STDIN else Path(path).resolve().parent


# --------------------------------------------------------------------------------------------- output


def output_header(fmt: str, task: dict) -> Optional[str]:
    """The TSV header line (None for JSONL); a ConfigError when a class name cannot be a TSV column."""
    if fmt != "tsv":
        return None
    if task["kind"] == "regression":
        return "score\n"
    bad = [name for name in task["labels"] if any(ch in name for ch in "\t\r\n")]
    if bad:
        raise ConfigError("--output_format", f"class name(s) {bad} hold a tab or line break; use jsonl")
    return "\t".join(["label", *(f"prob_{name}" for name in task["labels"])]) + "\n"


def output_line(prediction, fmt: str, labels: Sequence[str]) -> str:
    """One output record: a JSON object line, or a TSV row in the header's column order."""
    if fmt == "jsonl":
        return json.dumps(prediction.record(), ensure_ascii=False) + "\n"
    if prediction.score is not None:
        return f"{prediction.score!r}\n"
    return "\t".join([prediction.label, *(repr(prediction.probabilities[name]) for name in labels)]) + "\n"


def output_text(predictions: Iterable[Any], fmt: str, task: dict) -> Iterator[str]:
    """The output, piece by piece: the header (TSV), then one line per prediction."""
    header = output_header(fmt, task)
    if header is not None:
        yield header
    for prediction in predictions:
        yield output_line(prediction, fmt, task["labels"])


def write_output(pieces: Iterable[str], output: Optional[str]) -> None:
    """Write ``pieces`` to stdout, or to file ``output`` atomically (whole or not at all)."""
    if output is None or output == STDIN:
        try:
            for piece in pieces:
                sys.stdout.write(piece)
            sys.stdout.flush()
        except BrokenPipeError:  # the reader stopped early (| head): not an error of ours
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's final flush does not fail again
        return
    from ..fileio import atomic_write_via

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="\n") as handle:
            for piece in pieces:
                handle.write(piece)

    atomic_write_via(output, write)


# --------------------------------------------------------------------------------------------- the command


def check_arguments(args: argparse.Namespace) -> None:
    """ConfigErrors for arguments that cannot work, before anything is read."""
    if args.batch_size < 1:
        raise ConfigError("--batch_size", f"expected a positive integer, got {args.batch_size}")
    if args.weights != "int8" and args.backend != "int8":
        raise ConfigError("--weights", f"{args.weights} is a mode of the int8 backend, not of --backend "
                                       f"{args.backend}")
    if args.compile and args.backend != "int8":
        raise ConfigError("--compile", f"compiled kernels are the int8 backend's, not --backend {args.backend}'s")
    if args.output not in (None, STDIN):
        if os.path.isdir(args.output):
            raise ConfigError("--output", f"{args.output} is a folder; name the predictions file")
        if os.path.exists(args.output) and not args.overwrite:
            raise ConfigError("--output", f"{args.output} exists; pass --overwrite to replace it")
        if args.input != STDIN and os.path.exists(args.input) and os.path.exists(args.output) \
                and os.path.samefile(args.input, args.output):
            raise ConfigError("--output", "is the input file; write the predictions elsewhere")
    elif args.eval and args.output == STDIN:
        raise ConfigError("--output", "with --eval the metrics go to stdout; write the predictions to a file")


def load_model(folder: str, backend: str, weights: str = "int8", compile: bool = False):
    """The exported student run by ``backend`` (``weights``, ``compile``: the int8 backend's weight mode and
    compiled kernels); a missing optional dependency is a ConfigError saying what to install."""
    import ds_kdqat

    try:
        return ds_kdqat.load_student(folder, backend, weights=weights, compile=compile)
    except ImportError as error:
        raise ConfigError("--backend", f"the {backend} backend needs packages that are not installed ({error}): "
                                       "pip install 'ds-kdqat[deploy]'") from None


def progress(predictions: Iterable[Any], total: int, enabled: bool, unit: str = "ex") -> Iterator[Any]:
    """``predictions`` counted by a tqdm bar on stderr (when ``enabled`` and stderr is a terminal)."""
    from tqdm.auto import tqdm

    with tqdm(total=total, unit=unit, desc="predict", file=sys.stderr, disable=not enabled,
              dynamic_ncols=True) as bar:
        for prediction in predictions:
            yield prediction
            bar.update(1)


def run(args: argparse.Namespace) -> int:
    from ..deploy.artifact import read_export
    from ..deploy.predict import Predictor, task_metrics

    check_arguments(args)
    task = read_export(args.export_dir)["task"]
    if task["kind"] == "qa":
        return run_qa(args, task)
    if task["kind"] not in ("classification", "regression", "image_classification"):
        raise ConfigError("EXPORT_DIR", f"{args.export_dir} is a {task['kind']!r} model; predict supports "
                                        "classification, regression, image classification and QA exports")
    if args.format == "squad" or args.output_format == "squad":
        option = "--format" if args.format == "squad" else "--output_format"
        raise ConfigError(option, f"squad is for extractive-QA exports; {args.export_dir} is a "
                                  f"{task['kind']!r} model")
    rows = read_inputs(args, task)
    predictor = Predictor(load_model(args.export_dir, args.backend, args.weights, args.compile))
    predictions = predictor.predict((row.example for row in rows), args.batch_size)
    predictions = progress(predictions, len(rows), not args.no_progress and sys.stderr.isatty())
    if not args.eval:
        write_output(output_text(predictions, args.output_format, task), args.output)
        return 0
    kept: list[Any] = []
    predictions = (kept.append(p) or p for p in predictions)
    if args.output not in (None, STDIN):
        write_output(output_text(predictions, args.output_format, task), args.output)
    else:
        for _ in predictions:
            pass
    metrics = task_metrics(task, kept, [row.label if task["kind"] != "regression" else float(row.label)
                                        for row in rows])
    print(json.dumps({**metrics, "examples": len(rows), "task": task["name"]}))
    return 0


# --------------------------------------------------------------------------------------------- extractive QA


def check_qa_arguments(args: argparse.Namespace) -> None:
    """ConfigErrors for options that a QA export does not take."""
    if args.text_columns or args.label_column:
        raise ConfigError("--text_columns/--label_column", "not for a QA export: its input is SQuAD JSON or JSON "
                                                           "Lines with the keys id, question, context")
    if args.output_format not in QA_OUTPUT_FORMATS:
        raise ConfigError("--output_format", f"got {args.output_format!r}; a QA export writes "
                                             f"{' or '.join(QA_OUTPUT_FORMATS)}")
    qa_input_format(args.input, args.format)


def qa_input_format(path: str, explicit: str) -> str:
    """``squad`` or ``jsonl``: ``explicit`` unless ``auto``; then ``squad`` for a ``.json`` file, else jsonl."""
    if explicit == "auto":
        return "squad" if path != STDIN and Path(path).suffix.lower() == ".json" else "jsonl"
    if explicit not in QA_INPUT_FORMATS:
        raise ConfigError("--format", f"got {explicit!r}; a QA export reads {' or '.join(QA_INPUT_FORMATS)} (SQuAD "
                                      "JSON, or JSON Lines with id, question, context)")
    return explicit


def squad_questions(data: Any, source: str) -> list:
    """The questions of a loaded SQuAD JSON object, gold answers not read (they may be absent): QAExamples
    without answers, in file order. A DataError names ``source`` and the place (``data[0].paragraphs[1]``) or
    ``source:<question id>``."""
    from ..data.qa import QAExample, json_key, squad_records

    examples = []
    for qid, qa, context, where in squad_records(data, source):
        question = json_key(qa, "question", str, f"{source}:{qid}", "question").strip()
        if not question:
            raise DataError(f"{source}:{qid}", "empty question")
        if not context.strip():
            raise DataError(f"{source}:{qid}", f"{where}: empty context")
        examples.append(QAExample(qid, question, context, ()))
    return examples


def read_squad_input(name: str, data: bytes, version: int, labelled: bool) -> list:
    """The questions of SQuAD JSON ``data``; ``labelled`` (--eval): with their gold answers, checked as training
    checks them for SQuAD ``version`` (:func:`ds_kdqat.data.qa.parse_squad`)."""
    from ..data.qa import parse_squad

    try:
        loaded = json.loads(data.decode("utf-8-sig"))
    except (ValueError, UnicodeDecodeError) as error:
        raise DataError(name, f"not a JSON file ({error}); expected SQuAD JSON (--format squad), or use "
                              "--format jsonl for one question object per line") from None
    return parse_squad(loaded, name, version) if labelled else squad_questions(loaded, name)


def read_jsonl_questions(name: str, data: bytes, labelled: bool) -> list:
    """One question per JSON Lines object {"id", "question", "context"} (and with ``labelled`` "answers": texts
    or {"text": ...} objects, [] for no answer); a DataError names ``name:line``."""
    from ..data import files
    from ..data.qa import QAExample, json_key

    if not data.strip():
        raise DataError(name, "empty input (expected one {\"id\", \"question\", \"context\"} object per line)")
    examples, seen = [], set()
    for record in files._read_jsonl(name, data).records:
        where = f"{name}:{record.line}"
        if record.reason is not None:
            raise DataError(where, record.reason)
        values = record.values
        texts = [json_key(values, key, str, where, "record") for key in ("id", "question", "context")]
        for key, text in zip(("question", "context"), texts[1:]):
            if not text.strip():
                raise DataError(where, f"empty {key}")
        if texts[0] in seen:
            raise DataError(where, f"duplicate question id {texts[0]!r}")
        seen.add(texts[0])
        answers = tuple((text, -1) for text in _gold_texts(values, where)) if labelled else ()
        examples.append(QAExample(texts[0], texts[1].strip(), texts[2], answers, labelled and not answers))
    return examples


def _gold_texts(values: dict, where: str) -> list[str]:
    """The gold answer texts of a JSON Lines question (--eval): its "answers" list."""
    from ..data.qa import json_key

    answers = json_key(values, "answers", list, where, "record (--eval needs the gold answers)")
    texts = []
    for i, answer in enumerate(answers):
        text = answer.get("text") if isinstance(answer, dict) else answer
        if not isinstance(text, str):
            raise DataError(where, f"answers[{i}]: expected an answer text or an object with a 'text' string")
        texts.append(text)
    return texts


def read_qa_inputs(args: argparse.Namespace, version: int) -> list:
    """The questions of ``--input`` (QAExamples, with gold answers under --eval), in input order."""
    fmt = qa_input_format(args.input, args.format)
    name, data = read_input_bytes(args.input)
    if fmt == "squad":
        return read_squad_input(name, data, version, args.eval)
    return read_jsonl_questions(name, data, args.eval)


def qa_output_text(predictions: Sequence[Any], fmt: str) -> Iterator[str]:
    """jsonl: one {"id", "answer", "score"} line per question; squad: the {id: answer} object."""
    if fmt == "squad":
        yield json.dumps({p.id: p.answer for p in predictions}, ensure_ascii=False, indent=1) + "\n"
        return
    for prediction in predictions:
        yield json.dumps(prediction.record(), ensure_ascii=False) + "\n"


def qa_metrics(task: dict, predictions: Sequence[Any], examples: Sequence[Any]) -> dict[str, float]:
    """SQuAD EM/F1 (:func:`ds_kdqat.data.qa_metrics.squad_em_f1`, with HasAns_/NoAns_ when some question has no
    answer), the task's primary metric first."""
    from ..data.qa_metrics import squad_em_f1

    metrics = squad_em_f1({p.id: p.answer for p in predictions}, {ex.id: ex.answer_texts for ex in examples})
    primary = task.get("primary_metric") or "f1"
    return {**({primary: metrics[primary]} if primary in metrics else {}), **metrics}


def run_qa(args: argparse.Namespace, task: dict) -> int:
    """``ds-kdqat predict`` of an extractive-QA export (see the module docstring)."""
    from ..deploy.artifact import qa_settings_of
    from ..deploy.predict import Predictor

    check_qa_arguments(args)
    settings, _ = qa_settings_of(task, os.path.join(args.export_dir, "manifest.json"))
    examples = read_qa_inputs(args, settings.version)
    predictor = Predictor(load_model(args.export_dir, args.backend, args.weights, args.compile))
    features = predictor.qa_features(examples)
    logits = progress(predictor.feature_logits(features, args.batch_size), len(features),
                      not args.no_progress and sys.stderr.isatty(), unit="window")
    predictions = predictor.answers(examples, features, list(logits))
    if not args.eval or args.output not in (None, STDIN):
        write_output(qa_output_text(predictions, args.output_format), args.output)
    if args.eval:
        metrics = qa_metrics(task, predictions, examples)
        print(json.dumps({**metrics, "examples": len(examples), "task": task["name"]}))
    return 0
