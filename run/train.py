"""Train a ternary-weight, 8-bit-activation student by KD-QAT; the README's main job.

    deepspeed run/train.py --ds_config ds_configs/ternary.json
    python run/train.py --ds_config ds_configs/ternary.json --set kdqat.distill.recipe=map
    torchrun --standalone --nproc_per_node 2 run/train.py --ds_config ds_configs/ternary.json

Re-running the same command resumes an interrupted run. A bad config exits with status 2 before any
model loads; an interrupted run (SIGTERM/SIGINT) checkpoints and exits with status 143.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ds_kdqat.cli import main_train  # noqa: E402

if __name__ == "__main__":
    sys.exit(main_train(sys.argv[1:]))
