"""Sweeps over recipes × tasks × seeds × budgets × hyper-parameters: run, resume, SLURM, results table.

Entry point: ``run/sweep.py``. Library API::

    config = load_sweep_config("sweeps/minilm.yaml", overrides=["axes.seeds=[1,2]"])
    report = run_sweep(config)            # local, one point after another, resumable
    paths = aggregate_sweep(config)       # results_table.md / .csv, results_points.csv
    script = write_sbatch(config)         # SLURM array script instead of running
"""

from .aggregate import aggregate_sweep, build_table, to_markdown
from .config import AggregateConfig, SlurmConfig, SweepAxes, SweepConfig, SweepKeys, load_sweep_config
from .grid import GridPoint, grid_points, point_command, point_dir
from .runner import SweepReport, run_point, run_sweep, write_sweep_status
from .slurm import render_sbatch, write_sbatch

__all__ = [
    "AggregateConfig", "SlurmConfig", "SweepAxes", "SweepConfig", "SweepKeys", "load_sweep_config",
    "GridPoint", "grid_points", "point_command", "point_dir",
    "SweepReport", "run_point", "run_sweep", "write_sweep_status",
    "aggregate_sweep", "build_table", "to_markdown", "render_sbatch", "write_sbatch",
]
