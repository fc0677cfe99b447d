"""Shim: `python run/predict.py …` is `ds-kdqat predict …` (ds_kdqat/commands/predict.py; --help for its options)."""
import sys

from ds_kdqat.cli import command_main

main = command_main("predict")

if __name__ == "__main__":
    sys.exit(main())
