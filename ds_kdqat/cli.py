"""The ``ds-kdqat`` command: one subcommand per job (see :mod:`ds_kdqat.commands`), and the exit statuses
of all of them, decided here alone. The scripts in run/ are shims over :func:`main`.

Exit statuses:

* 0: done.
* 2: bad input. A config or data error (:class:`~ds_kdqat.errors.ConfigError`,
  :class:`~ds_kdqat.errors.DataError`, a ``FileNotFoundError`` of an input) is printed as one line,
  ``ds-kdqat <kind> error: <message>``, naming the key or ``file:line``; argparse's usage errors are 2 too.
* 143: stopped by a signal. Training checkpoints and raises ``StopTraining`` (a ``SystemExit(143)``);
  a ``KeyboardInterrupt`` that reaches this module is reported the same way.
* 1: a bug; the traceback is printed.

``sweep`` has two outcomes of its own: 1 when some grid point failed, 3 when some point is being run by
another process (see :mod:`ds_kdqat.commands.sweep`); ``launch`` passes on the launcher's status.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Callable, Optional, Sequence

from .commands import COMMANDS, load
from .commands.run_config import add_config_arguments, load_run_config
from .errors import ConfigError, DataError, OutputFolderError

__all__ = ["main", "command_main", "main_train", "main_finetune", "build_parser", "run_command",
           "report_input_error", "config_parser", "load_run_config", "drop_script_folder",
           "EXIT_OK", "EXIT_BUG", "EXIT_INPUT", "EXIT_STOPPED"]

PROG = "ds-kdqat"
EXIT_OK = 0
EXIT_BUG = 1
EXIT_INPUT = 2
EXIT_STOPPED = 143

_FORMATTER = argparse.RawDescriptionHelpFormatter


def report_input_error(error: Exception) -> int:
    """Print a config/data error as the one line ``ds-kdqat <kind> error: <message>``; returns 2."""
    if isinstance(error, OutputFolderError):
        kind = "output folder error"
    else:
        kind = "config error" if isinstance(error, ConfigError) else "data error"
    if isinstance(error, FileNotFoundError) and error.filename:
        error = f"{error.filename}: {error.strerror}"
    print(f"ds-kdqat {kind}: {error}", file=sys.stderr)
    return EXIT_INPUT


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The ``ds-kdqat`` parser. Only ``command``'s options are added (its module imported): the others'
    modules stay unloaded, so ``ds-kdqat --help`` is quick."""
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=_FORMATTER,
        description="KD-QAT of ternary-weight, 8-bit-activation Transformer encoders on DeepSpeed.",
        epilog=f"'{PROG} COMMAND --help' shows a command's options. Multi-process runs:\n"
               "  deepspeed run/train.py --ds_config CONFIG   (or: ds-kdqat launch run/train.py ...)\n"
               "Exit status: 0 done, 2 config or data error, 143 stopped by a signal, 1 a bug.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    for name, (_, summary) in COMMANDS.items():
        if name != command:
            subparsers.add_parser(name, help=summary)
            continue
        module = load(name)
        sub = subparsers.add_parser(name, help=summary, description=module.DESCRIPTION, formatter_class=_FORMATTER,
                                    **getattr(module, "PARSER_OPTIONS", {}))
        module.add_arguments(sub)
    return parser


def run_command(job: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run ``job(args)`` and map what it raises to the exit statuses of this module."""
    try:
        return job(args)
    except (ConfigError, DataError, FileNotFoundError) as error:
        return report_input_error(error)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_STOPPED
    except Exception:  # a bug: show where
        traceback.print_exc()
        return EXIT_BUG


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``ds-kdqat COMMAND [options]``; returns the exit status (argparse exits 0/2 itself for --help/usage)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(command).parse_args(argv)
    return run_command(load(args.command).run, args)


def command_main(command: str) -> Callable[[Optional[Sequence[str]]], int]:
    """``main`` of one subcommand: ``command_main("train")(argv)`` is ``main(["train", *argv])``, with
    ``sys.argv[1:]`` when ``argv`` is None (what the shims in run/ call)."""

    def command_entry(argv: Optional[Sequence[str]] = None) -> int:
        return main([command, *(sys.argv[1:] if argv is None else argv)])

    command_entry.__name__ = command_entry.__qualname__ = f"main_{command.replace('-', '_')}"
    return command_entry


def drop_script_folder(script: str) -> None:
    """Take the folder of ``script`` off ``sys.path``. Python puts a script's folder first there, and in run/
    the shim run/augment.py would hide the ``augment`` package from run/augment.py and run/fit_mlm_head.py."""
    folder = os.path.dirname(os.path.realpath(script))
    sys.path[:] = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) != folder]


def config_parser(description: str) -> argparse.ArgumentParser:
    """A stand-alone parser of the ``train``/``finetune`` options (``--ds_config``, ``--set`` …)."""
    parser = argparse.ArgumentParser(description=description)
    add_config_arguments(parser)
    return parser


main_train = command_main("train")
main_finetune = command_main("finetune")
