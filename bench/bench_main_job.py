"""The README's main job on the embedded default, timed: set-up, teacher fine-tuning, KD-QAT, total.

    python bench/bench_main_job.py [--output_dir outputs/bench_main] [--launcher deepspeed] [--set k=v ...]

Starts from an empty output folder (so the teacher is fine-tuned too), runs
``deepspeed run/train.py --ds_config ds_configs/ternary.json``, and prints the figures that go into
docs/benchmarks.md: wall time per stage and in all, teacher and student dev accuracy, their ratio (target
≥ 0.95), the packed size. Set-up time is measured separately by timing ``bash scripts/setup.sh``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/bench_main")
    parser.add_argument("--ds_config", default="ds_configs/ternary.json")
    parser.add_argument("--launcher", default=str(Path(sys.executable).parent / "deepspeed"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    out = REPO / args.output_dir
    shutil.rmtree(out, ignore_errors=True)
    command = [*args.launcher.split(), "run/train.py", "--ds_config", args.ds_config, "--output_dir", str(out)]
    for item in args.overrides:
        command += ["--set", item]
    started = time.time()
    subprocess.run(command, cwd=REPO, check=True)
    wall = time.time() - started
    results = json.loads((out / "results.json").read_text())
    metric = results["primary_metric"]
    teacher, student = results["teacher"][metric], results["student"][metric]
    figures = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "command": " ".join(command[len(args.launcher.split()):]),
        "wall_time_min": round(wall / 60, 2),
        "stage_minutes": {k: round(v / 60, 2) for k, v in results["stage_times_s"].items()},
        f"teacher_{metric}": teacher,
        f"student_{metric}": student,
        "student_over_teacher": round(student / teacher, 4),
        "packed": results["size"],
        "steps": results["steps"],
    }
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
