"""Shim: `python run/augment.py …` is `ds-kdqat augment …` (ds_kdqat/commands/augment.py; --help for its options)."""
import sys

from ds_kdqat.cli import command_main, drop_script_folder

drop_script_folder(__file__)  # run/augment.py, first on sys.path, would hide the augment package
main = command_main("augment")

if __name__ == "__main__":
    sys.exit(main())
