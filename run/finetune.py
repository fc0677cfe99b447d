"""Shim: `python run/finetune.py …` is `ds-kdqat finetune …` (ds_kdqat/commands/finetune.py; --help for its options)."""
import sys

from ds_kdqat.cli import command_main

main = command_main("finetune")

if __name__ == "__main__":
    sys.exit(main())
