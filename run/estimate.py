"""Shim: `python run/estimate.py …` is `ds-kdqat estimate …` (ds_kdqat/commands/estimate.py; --help for its options)."""
import sys

from ds_kdqat.cli import command_main

main = command_main("estimate")

if __name__ == "__main__":
    sys.exit(main())
