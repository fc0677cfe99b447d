"""Launch training under DeepSpeed so that SIGTERM/Ctrl-C checkpoint and exit 143, on a free port.

    python run/launch.py run/train.py --ds_config ds_configs/ternary.json
    python run/launch.py --num_accelerators 2 run/train.py --ds_config ds_configs/ternary.json

Takes what ``deepspeed`` takes. On SIGTERM or SIGINT the training ranks checkpoint at the end of the
current step and the wrapper exits 143 once every process of the job is gone (a second signal terminates
them all, a third kills them). When port 29500 is taken and no --master_port is given, a free port is used.
See ds_kdqat/training/launch.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ds_kdqat.training.launch import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
