"""Shim: `python run/launch.py …` is `ds-kdqat launch …` (ds_kdqat/commands/launch.py; --help for its options)."""
import sys

from ds_kdqat.cli import command_main

main = command_main("launch")

if __name__ == "__main__":
    sys.exit(main())
