"""Shim: `python run/train.py …` is `ds-kdqat train …` (ds_kdqat/commands/train.py; --help for its options)."""
import sys

from ds_kdqat.cli import command_main

main = command_main("train")

if __name__ == "__main__":
    sys.exit(main())
