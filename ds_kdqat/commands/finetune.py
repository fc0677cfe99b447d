"""Fine-tune the full-precision teacher only (stage 1 of train), and cache it in output_dir/teacher/.

    ds-kdqat finetune --ds_config ds_configs/ternary.json
    deepspeed run/finetune.py --ds_config ds_configs/ternary.json

``train`` does this itself when the teacher needs it; this command is for preparing teachers ahead of a
sweep. Uses the config's kdqat.model, kdqat.data and kdqat.finetune sections. Prints the teacher's folder.
"""

from __future__ import annotations

import argparse

from .run_config import add_config_arguments, load_run_config

DESCRIPTION = __doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    config = load_run_config(args)
    from ..pipeline import run_finetune

    print(run_finetune(config, args.overwrite, args.resume_anyway))
    return 0
