"""Argument parsing shared by the entry points in run/ (which stay thin)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from .errors import ConfigError, DataError, OutputFolderError


def config_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--ds_config", "--deepspeed_config", dest="ds_config", required=True,
                        help="ds_config JSON: DeepSpeed's keys plus the 'kdqat' section")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set kdqat.distill.recipe=map (repeatable; "
                             "the value is JSON when it parses, else a string)")
    parser.add_argument("--output_dir", help="shorthand for --set kdqat.output_dir=DIR")
    changed = parser.add_mutually_exclusive_group()
    changed.add_argument("--overwrite", action="store_true",
                         help="when the output folder holds a run with another config: move that run aside to "
                              "<output_dir>.replaced-<time> and start afresh")
    changed.add_argument("--resume-anyway", "--resume_anyway", dest="resume_anyway", action="store_true",
                         help="when the output folder holds a run with another config: go on from its "
                              "checkpoints with the new config (the change is recorded in the folder's marker)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return parser


def load_run_config(args):
    """The validated :class:`~ds_kdqat.config.RunConfig` of parsed arguments (ConfigError if bad)."""
    from .config import load_config

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"kdqat.output_dir={args.output_dir}")
    return load_config(args.ds_config, overrides)


def report_input_error(error: Exception) -> int:
    if isinstance(error, OutputFolderError):
        kind = "output folder error"
    else:
        kind = "config error" if isinstance(error, ConfigError) else "data error"
    if isinstance(error, FileNotFoundError) and error.filename:
        error = f"{error.filename}: {error.strerror}"
    print(f"ds-kdqat {kind}: {error}", file=sys.stderr)
    return 2


def _main(argv: Optional[list[str]], description: str, job) -> int:
    args = config_parser(description).parse_args(argv)
    try:
        run = load_run_config(args)
    except ConfigError as error:
        return report_input_error(error)
    try:
        job(run, args.overwrite, args.resume_anyway)
    except (ConfigError, DataError, FileNotFoundError) as error:
        return report_input_error(error)
    return 0


def main_train(argv: Optional[list[str]] = None) -> int:
    from .pipeline import run_job

    return _main(argv, "KD-QAT of a ternary student (ds-kdqat)", run_job)


def main_finetune(argv: Optional[list[str]] = None) -> int:
    from .pipeline import run_finetune

    return _main(argv, "Fine-tune the full-precision teacher (ds-kdqat stage 1)",
                 lambda *args: print(run_finetune(*args)))
