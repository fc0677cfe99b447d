"""Shim: `python run/sweep.py …` is `ds-kdqat sweep …` (ds_kdqat/commands/sweep.py; --help for its options)."""
import sys

from ds_kdqat.cli import command_main

main = command_main("sweep")

if __name__ == "__main__":
    sys.exit(main())
