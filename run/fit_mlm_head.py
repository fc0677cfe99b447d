"""Shim: `python run/fit_mlm_head.py …` is `ds-kdqat fit-mlm-head …` (ds_kdqat/commands/fit_mlm_head.py; --help for its options)."""
import sys

from ds_kdqat.cli import command_main, drop_script_folder

drop_script_folder(__file__)  # run/augment.py, first on sys.path, would hide the augment package
main = command_main("fit-mlm-head")

if __name__ == "__main__":
    sys.exit(main())
