"""Run a grid of KD-QAT trainings and tabulate "mean ± std" per task, like the papers' tables.

    ds-kdqat sweep --config sweeps/minilm.yaml                 # run locally, one point after another
    ds-kdqat sweep --config sweeps/minilm.yaml --list          # the grid, indices and status
    ds-kdqat sweep --config sweeps/minilm.yaml --slurm         # write an sbatch array script, run nothing
    ds-kdqat sweep --config OUT/sweep_config.json --run-index 3   # one point (what an array task runs)
    ds-kdqat sweep --config sweeps/minilm.yaml --aggregate-only   # rebuild the table from results.json

Re-running the same command resumes: points with results.json are skipped. Exit status: 0 when every
selected point is done, 1 when some point failed, 2 for a bad sweep file (or results that cannot be
tabulated), 3 when some point is being run by another process (nothing failed), 143 when interrupted.
"""

from __future__ import annotations

import argparse
import signal
import sys

from ..errors import ConfigError

DESCRIPTION = __doc__

POINT_FAILED = 1  # some selected point's trainer failed
POINT_BUSY = 3  # some selected point is being run by another process; nothing failed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="sweep file (JSON or YAML)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the sweep file, e.g. --set axes.seeds=[1,2,3] (repeatable)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--slurm", action="store_true", help="write an sbatch array script and exit")
    mode.add_argument("--run-index", type=int, action="append", metavar="I",
                      help="run only grid point I (repeatable); SLURM array tasks use this")
    mode.add_argument("--aggregate-only", action="store_true", help="only rebuild the status and the tables")
    mode.add_argument("--list", action="store_true", help="print the grid with status and exit")
    mode.add_argument("--dry-run", action="store_true", help="print each point's command and exit")


def _raise_on_sigterm(signum, frame):
    raise SystemExit(143)


def print_grid(config, points, commands: bool) -> None:
    """One line per point: index, status and name (``--list``), or its command (``--dry-run``)."""
    from ..sweep import point_command
    from ..sweep.runner import point_status

    for point in points:
        if commands:
            print(" ".join(point_command(config, point)))
        else:
            print(f"{point.index:4d}  {point_status(config, point)['status']:11s}  {point.name}")


def run_points(config, indices):
    """Run the selected points (all when ``indices`` is None); SIGTERM stops the sweep and its trainer."""
    from ..sweep import run_sweep

    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        return run_sweep(config, indices)
    except IndexError as error:
        raise ConfigError("--run-index", str(error)) from None


def run(args: argparse.Namespace) -> int:
    from ..sweep import aggregate_sweep, grid_points, load_sweep_config, write_sbatch
    from ..sweep.runner import write_sweep_status

    config = load_sweep_config(args.config, args.set)
    points = grid_points(config)
    if args.slurm:
        script = write_sbatch(config)
        print(f"wrote {script} ({len(points)} array tasks); submit with: sbatch {script}")
        return 0
    if args.list or args.dry_run:
        print_grid(config, points, commands=args.dry_run)
        return 0
    if args.aggregate_only:
        report = None
        write_sweep_status(config, points)
    else:
        report = run_points(config, args.run_index)

    paths = aggregate_sweep(config)  # DataError when some results.json cannot be tabulated
    print(f"table: {paths['markdown']}")
    with open(paths["markdown"], encoding="utf-8") as handle:
        print(handle.read())
    if report is None:
        return 0
    if report.failed:
        names = ", ".join(f"[{o.point.index}] {o.point.name}" for o in report.failed)
        print(f"{len(report.failed)} point(s) failed: {names}", file=sys.stderr)
        return POINT_FAILED
    if report.busy:
        print(f"{len(report.busy)} point(s) are being run by another process", file=sys.stderr)
        return POINT_BUSY
    return 0
