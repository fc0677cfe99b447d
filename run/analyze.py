"""Shim: `python run/analyze.py …` is `ds-kdqat analyze …` (ds_kdqat/commands/analyze.py; --help for its options)."""
import sys

from ds_kdqat.cli import command_main

main = command_main("analyze")

if __name__ == "__main__":
    sys.exit(main())
