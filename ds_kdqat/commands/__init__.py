"""The subcommands of ``ds-kdqat``, one module each, all of the same shape.

A command module has ``DESCRIPTION`` (the text its ``--help`` starts with), ``add_arguments(parser)``
and ``run(args) -> int``, and may have ``PARSER_OPTIONS`` (extra keyword arguments for its sub-parser).
``run`` reports a bad input by raising :class:`~ds_kdqat.errors.ConfigError`,
:class:`~ds_kdqat.errors.DataError` or ``FileNotFoundError``; :func:`ds_kdqat.cli.main` turns those into
exit status 2 and owns the other exit statuses too. A module is imported only when its command is asked
for, so ``ds-kdqat --help`` loads neither torch nor DeepSpeed.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# command name -> (module in this package, the one line ``ds-kdqat --help`` shows)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train", "KD-QAT of a ternary student (fine-tunes the teacher first when it needs to)"),
    "finetune": ("finetune", "fine-tune the full-precision teacher only (stage 1 of train)"),
    "augment": ("augment", "TinyBERT-style data augmentation of a task's train file"),
    "fit-mlm-head": ("fit_mlm_head", "fit a masked-LM head (with the top encoder layers) for an encoder that has none"),
    "analyze": ("analyze", "compare teacher, quantized and student on a data split; plot training curves"),
    "sweep": ("sweep", "run a grid of trainings and tabulate mean ± std per task"),
    "export": ("export", "write the self-contained export of a trained student (optionally ONNX too)"),
    "predict": ("predict", "predict with an exported student: a task file or lines in, labels out"),
    "launch": ("launch", "run DeepSpeed's launcher so that SIGTERM/Ctrl-C checkpoint and exit 143"),
    "estimate": ("estimate", "per-rank memory of a run by part, the largest micro batch that fits, what to change"),
}


def load(name: str) -> ModuleType:
    """The module of command ``name`` (a key of :data:`COMMANDS`)."""
    return importlib.import_module(f"{__name__}.{COMMANDS[name][0]}")
