"""The options shared by ``train`` and ``finetune``: a ds_config, ``--set`` overrides, the output folder."""

from __future__ import annotations

import argparse


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--ds_config``, ``--set``, ``--output_dir``, ``--overwrite``/``--resume-anyway`` and the launcher's
    ``--local_rank`` (which DeepSpeed's launcher appends; hidden and ignored)."""
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


def load_run_config(args: argparse.Namespace):
    """The validated :class:`~ds_kdqat.config.RunConfig` of parsed arguments (ConfigError if bad)."""
    from ..config import load_config

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"kdqat.output_dir={args.output_dir}")
    return load_config(args.ds_config, overrides)
