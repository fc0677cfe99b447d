"""Launch training under DeepSpeed so that SIGTERM/Ctrl-C checkpoint and exit 143, on a free port.

    ds-kdqat launch run/train.py --ds_config ds_configs/ternary.json
    ds-kdqat launch --num_accelerators 2 run/train.py --ds_config ds_configs/ternary.json

Takes what ``deepspeed`` takes; ``ds-kdqat launch --help`` prints the details
(:mod:`ds_kdqat.training.launch`).
"""

from __future__ import annotations

import argparse

DESCRIPTION = __doc__

# The command line is DeepSpeed's launcher options, the training script and its arguments: none of it is
# an option of ds-kdqat. So the sub-parser treats no word as an option (no prefix character a command line
# uses, no -h of its own) and hands every word, --help included, to the launcher wrapper.
PARSER_OPTIONS = {"add_help": False, "prefix_chars": "\0"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("argv", nargs=argparse.REMAINDER,
                        help="[deepspeed launcher options] SCRIPT [script arguments]")


def run(args: argparse.Namespace) -> int:
    from ..training.launch import main

    return main(args.argv)
