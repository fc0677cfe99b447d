"""Run a grid of KD-QAT trainings and tabulate "mean ± std" per task, like the papers' tables.

    python run/sweep.py --config sweeps/minilm.yaml                 # run locally, one point after another
    python run/sweep.py --config sweeps/minilm.yaml --list          # the grid, indices and status
    python run/sweep.py --config sweeps/minilm.yaml --slurm         # write an sbatch array script, run nothing
    python run/sweep.py --config OUT/sweep_config.json --run-index 3   # one point (what an array task runs)
    python run/sweep.py --config sweeps/minilm.yaml --aggregate-only   # rebuild the table from results.json

Re-running the same command resumes: points with results.json are skipped. Exit status: 0 when every
selected point is done, 1 when some point failed, 2 for a bad sweep file, 3 when some point is being run by
another process (nothing failed), 130/143 when interrupted.
"""

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ds_kdqat.errors import ConfigError, DataError  # noqa: E402
from ds_kdqat.sweep import aggregate_sweep, grid_points, load_sweep_config, point_command, run_sweep, write_sbatch  # noqa: E402
from ds_kdqat.sweep.runner import point_status, write_sweep_status  # noqa: E402


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    return parser.parse_args(argv)


def _raise_on_sigterm(signum, frame):
    raise SystemExit(143)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_sweep_config(args.config, args.set)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    points = grid_points(config)

    if args.slurm:
        script = write_sbatch(config)
        print(f"wrote {script} ({len(points)} array tasks); submit with: sbatch {script}")
        return 0
    if args.list or args.dry_run:
        for point in points:
            if args.list:
                print(f"{point.index:4d}  {point_status(config, point)['status']:11s}  {point.name}")
            else:
                print(" ".join(point_command(config, point)))
        return 0

    if not args.aggregate_only:
        signal.signal(signal.SIGTERM, _raise_on_sigterm)
        try:
            report = run_sweep(config, args.run_index)
        except IndexError as error:
            print(f"error: --run-index: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130
    else:
        report = None
        write_sweep_status(config, points)

    try:
        paths = aggregate_sweep(config)
    except DataError as error:
        print(f"error: cannot aggregate: {error}", file=sys.stderr)
        return 1
    print(f"table: {paths['markdown']}")
    print(open(paths["markdown"], encoding="utf-8").read())
    if report is None:
        return 0
    if report.failed:
        names = ", ".join(f"[{o.point.index}] {o.point.name}" for o in report.failed)
        print(f"{len(report.failed)} point(s) failed: {names}", file=sys.stderr)
        return 1
    if report.busy:
        print(f"{len(report.busy)} point(s) are being run by another process", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
