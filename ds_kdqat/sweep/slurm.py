"""An sbatch array script for a sweep: array task ``i`` runs grid point ``i`` through ``run/sweep.py --run-index``.

The script refers to the config snapshot ``<output_root>/sweep_config.json`` (absolute paths), so what the
array runs is what was resolved when the script was written. Each task skips its point when it is already
done and leaves it alone when another process holds it, so resubmitting the same script resumes the sweep.
The per-point logs of SLURM go to ``<output_root>/slurm/%A_%a.out``.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from ..fileio import atomic_write_text
from .config import SweepConfig
from .grid import grid_points
from .runner import CONFIG_SNAPSHOT_FILE, write_config_snapshot

SWEEP_SCRIPT = Path(__file__).resolve().parents[2] / "run" / "sweep.py"


def render_sbatch(config: SweepConfig, num_points: int, workdir: str, python: str = sys.executable) -> str:
    slurm = config.slurm
    root = Path(config.output_root)
    array = f"0-{num_points - 1}" + (f"%{slurm.max_parallel}" if slurm.max_parallel else "")
    options = [
        f"--job-name={slurm.job_name}",
        f"--array={array}",
        f"--output={root / 'slurm' / '%A_%a.out'}",
        f"--nodes={slurm.nodes}",
        "--ntasks-per-node=1",
    ]
    if slurm.partition:
        options.append(f"--partition={slurm.partition}")
    if slurm.time:
        options.append(f"--time={slurm.time}")
    if slurm.gpus_per_task:
        options.append(f"--gpus-per-task={slurm.gpus_per_task}")
    if slurm.cpus_per_task:
        options.append(f"--cpus-per-task={slurm.cpus_per_task}")
    if slurm.mem:
        options.append(f"--mem={slurm.mem}")
    options += slurm.sbatch_options
    run = [python, str(SWEEP_SCRIPT), "--config", str(root / CONFIG_SNAPSHOT_FILE),
           "--run-index", "${SLURM_ARRAY_TASK_ID}"]
    lines = ["#!/bin/bash", f"# ds-kdqat sweep {config.name!r}: {num_points} grid points, one per array task."]
    lines += [f"#SBATCH {option}" for option in options]
    lines += [
        "",
        "set -euo pipefail",
        f"cd {shlex.quote(workdir)}",
        *slurm.setup,
        # the index stays unquoted-expandable; everything else is quoted
        " ".join(shlex.quote(word) if not word.startswith("${") else f'"{word}"' for word in run),
        "",
        f"# When the array is finished: {shlex.quote(python)} {shlex.quote(str(SWEEP_SCRIPT))} "
        f"--config {shlex.quote(str(root / CONFIG_SNAPSHOT_FILE))} --aggregate-only",
    ]
    return "\n".join(lines) + "\n"


def write_sbatch(config: SweepConfig, workdir: str | None = None) -> Path:
    """Write the config snapshot and the array script under ``output_root``; return the script's path."""
    points = grid_points(config)
    root = Path(config.output_root)
    (root / "slurm").mkdir(parents=True, exist_ok=True)
    write_config_snapshot(config)
    path = atomic_write_text(root / config.slurm.script, render_sbatch(config, len(points), workdir or os.getcwd()))
    path.chmod(0o755)
    return path
