"""Train a ternary-weight, 8-bit-activation student by KD-QAT; the README's main job.

    ds-kdqat train --ds_config ds_configs/ternary.json --set kdqat.distill.recipe=map
    deepspeed run/train.py --ds_config ds_configs/ternary.json
    torchrun --standalone --nproc_per_node 2 run/train.py --ds_config ds_configs/ternary.json

Re-running the same command resumes an interrupted run. A bad config exits with status 2 before any
model loads; an interrupted run (SIGTERM/SIGINT) checkpoints and exits with status 143.
"""

from __future__ import annotations

import argparse

from .run_config import add_config_arguments, load_run_config

DESCRIPTION = __doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    config = load_run_config(args)  # before importing the pipeline: a bad config fails fast
    from ..pipeline import run_job

    run_job(config, args.overwrite, args.resume_anyway)
    return 0
