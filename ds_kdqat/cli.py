"""Argument parsing shared by the entry points in run/ (which stay thin)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from .errors import ConfigError, DataError


def config_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--ds_config", "--deepspeed_config", dest="ds_config", required=True,
                        help="ds_config JSON: DeepSpeed's keys plus the 'kdqat' section")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set kdqat.distill.recipe=map (repeatable; "
                             "the value is JSON when it parses, else a string)")
    parser.add_argument("--output_dir", help="shorthand for --set kdqat.output_dir=DIR")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return parser


def load_run_config(args) -> "RunConfig":  # noqa: F821
    from .config import load_config

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"kdqat.output_dir={args.output_dir}")
    return load_config(args.ds_config, overrides)


def report_input_error(error: Exception) -> int:
    kind = "config error" if isinstance(error, ConfigError) else "data error"
    if isinstance(error, FileNotFoundError) and error.filename:
        error = f"{error.filename}: {error.strerror}"
    print(f"ds-kdqat {kind}: {error}", file=sys.stderr)
    return 2


def main_train(argv: Optional[list[str]] = None) -> int:
    args = config_parser("KD-QAT of a ternary student (ds-kdqat)").parse_args(argv)
    try:
        run = load_run_config(args)
    except ConfigError as error:
        return report_input_error(error)
    from .pipeline import run_job

    try:
        run_job(run)
    except (ConfigError, DataError, FileNotFoundError) as error:
        return report_input_error(error)
    return 0
