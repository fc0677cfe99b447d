"""Shim: `python run/export.py …` is `ds-kdqat export …` (ds_kdqat/commands/export.py; --help for its options)."""
import sys

from ds_kdqat.cli import command_main

main = command_main("export")

if __name__ == "__main__":
    sys.exit(main())
