"""Fine-tune the full-precision teacher only (stage 1 of run/train.py), and cache it in output_dir/teacher/.

    deepspeed run/finetune.py --ds_config ds_configs/ternary.json

run/train.py does this itself when the teacher needs it; this entry point is for preparing teachers ahead
of a sweep. Uses the config's kdqat.model, kdqat.data and kdqat.finetune sections.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ds_kdqat.cli import main_finetune  # noqa: E402

if __name__ == "__main__":
    sys.exit(main_finetune(sys.argv[1:]))
