"""Run grid points one after another, resumably, and keep a status file of the whole sweep.

A point is *done* when ``<point dir>/results.json`` exists (the trainer writes it atomically at the very
end). Resuming a sweep runs again exactly the points that are not done; the trainer resumes from its own
checkpoints inside the point directory.

Per point, the runner:

* holds an exclusive ``flock`` on ``<point dir>/.sweep.lock`` and hands the locked descriptor to the trainer
  process, so the lock is released only when both are gone; a second sweep (or a SLURM array task) that
  finds the lock taken reports the point as ``busy`` and leaves it alone;
* appends the trainer's stdout/stderr to ``<point dir>/sweep_train.log``;
* records ``<point dir>/sweep_point.json`` (status, return code, attempts, command, times) and rebuilds
  ``<output_root>/sweep_status.json`` from all points' records.

A point that exits non-zero, times out, or exits 0 without ``results.json`` is ``failed``; the sweep goes on
with the next point. A point whose record says ``running`` but whose lock is free was killed with its sweep:
it shows as ``interrupted`` and is run again on resume.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Literal, Optional, Sequence

from ..analysis.io import write_json
from ..training.run_folder import mark_output_dir
from .config import SweepConfig, sweep_config_to_json
from .grid import GridPoint, grid_points, point_command, point_dir

RESULTS_FILE = "results.json"
POINT_STATUS_FILE = "sweep_point.json"
SWEEP_STATUS_FILE = "sweep_status.json"
CONFIG_SNAPSHOT_FILE = "sweep_config.json"
LOCK_FILE = ".sweep.lock"
LOG_FILE = "sweep_train.log"

Outcome = Literal["done", "skipped", "failed", "busy"]


@dataclass
class PointOutcome:
    """What one call of :func:`run_point` did: ``skipped`` (already done), ``done`` (ran and finished),
    ``failed`` or ``busy`` (another process holds the point)."""

    point: GridPoint
    outcome: Outcome
    returncode: Optional[int] = None
    seconds: float = 0.0
    message: str = ""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def is_done(config: SweepConfig, point: GridPoint) -> bool:
    return (point_dir(config, point) / RESULTS_FILE).is_file()


@contextlib.contextmanager
def point_lock(directory: Path) -> Iterator[Optional[int]]:
    """Yield the descriptor of the held lock, or None when another process holds it. The point's folder is
    the trainer's output folder: it is made a ds-kdqat run folder first, so the trainer adopts it."""
    mark_output_dir(directory)
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                yield None
                return
            raise
        yield fd
    finally:
        os.close(fd)


def _lock_is_held(directory: Path) -> bool:
    if not (directory / LOCK_FILE).exists():
        return False
    with point_lock(directory) as fd:
        return fd is None


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_point_record(directory: Path, record: dict) -> None:
    write_json(directory / POINT_STATUS_FILE, record)


def _stop(process: subprocess.Popen, grace_s: float = 10.0) -> int:
    """SIGTERM (launchers forward it to their ranks), then SIGKILL after ``grace_s``."""
    process.terminate()
    try:
        return process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def run_point(config: SweepConfig, point: GridPoint, echo: Callable[[str], None] = print) -> PointOutcome:
    """Run one point unless it is done or busy; see the module docstring."""
    directory = point_dir(config, point)
    if is_done(config, point):
        return PointOutcome(point, "skipped", message="results.json exists")
    with point_lock(directory) as lock_fd:
        if lock_fd is None:
            return PointOutcome(point, "busy", message="another process is running this point")
        if is_done(config, point):  # finished while we waited for the lock
            return PointOutcome(point, "skipped", message="results.json exists")
        previous = _read_json(directory / POINT_STATUS_FILE) or {}
        command = point_command(config, point)
        record = {
            "index": point.index, "name": point.name, **point.spec, "status": "running",
            "attempts": int(previous.get("attempts", 0)) + 1, "command": command,
            "started": _now(), "finished": None, "returncode": None, "message": "", "pid": os.getpid(),
        }
        _write_point_record(directory, record)
        echo(f"[{point.index}] {point.name}: running (attempt {record['attempts']})")
        start = time.monotonic()
        message, returncode = "", None
        with open(directory / LOG_FILE, "ab") as log:
            log.write(f"\n=== {_now()} attempt {record['attempts']}: {' '.join(command)}\n".encode())
            log.flush()
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, pass_fds=(lock_fd,))
            try:
                returncode = process.wait(timeout=config.timeout_s)
            except subprocess.TimeoutExpired:
                returncode = _stop(process)
                message = f"killed after timeout_s={config.timeout_s:g}"
            except BaseException:  # KeyboardInterrupt, SystemExit from SIGTERM: stop the trainer too
                _stop(process)
                record.update(status="interrupted", finished=_now(), message="the sweep was interrupted")
                _write_point_record(directory, record)
                raise
        seconds = time.monotonic() - start
        finished = is_done(config, point)
        if returncode == 0 and not finished:
            message = f"exited 0 but wrote no {RESULTS_FILE}"
        elif returncode != 0 and not message:
            message = f"exited with code {returncode}; see {directory / LOG_FILE}"
        ok = returncode == 0 and finished
        record.update(status="done" if ok else "failed", finished=_now(), returncode=returncode,
                      message=message, seconds=round(seconds, 3))
        _write_point_record(directory, record)
    echo(f"[{point.index}] {point.name}: {'done' if ok else 'FAILED: ' + message} ({seconds:.1f} s)")
    return PointOutcome(point, "done" if ok else "failed", returncode, seconds, message)


def point_status(config: SweepConfig, point: GridPoint) -> dict:
    """The point's current state: done / failed / running / interrupted / pending, with its record."""
    directory = point_dir(config, point)
    record = _read_json(directory / POINT_STATUS_FILE) or {}
    if is_done(config, point):
        status = "done"
    elif record.get("status") == "running" or _lock_is_held(directory):
        status = "running" if _lock_is_held(directory) else "interrupted"
    elif record.get("status") in ("failed", "interrupted"):
        status = record["status"]
    else:
        status = "pending"
    return {
        "index": point.index, "name": point.name, "status": status, "dir": str(directory),
        "returncode": record.get("returncode"), "attempts": record.get("attempts", 0),
        "message": record.get("message", ""), **point.spec,
    }


def write_sweep_status(config: SweepConfig, points: Sequence[GridPoint]) -> dict:
    """Rebuild ``<output_root>/sweep_status.json`` from every point's own record; return it."""
    entries = [point_status(config, point) for point in points]
    counts: dict[str, int] = {}
    for entry in entries:
        counts[entry["status"]] = counts.get(entry["status"], 0) + 1
    status = {"sweep": config.name, "updated": _now(), "total": len(entries), "counts": counts, "points": entries}
    write_json(Path(config.output_root) / SWEEP_STATUS_FILE, status)
    return status


def write_config_snapshot(config: SweepConfig) -> Path:
    return write_json(Path(config.output_root) / CONFIG_SNAPSHOT_FILE, sweep_config_to_json(config))


@dataclass
class SweepReport:
    outcomes: list[PointOutcome]
    status: dict

    @property
    def failed(self) -> list[PointOutcome]:
        return [o for o in self.outcomes if o.outcome == "failed"]

    @property
    def busy(self) -> list[PointOutcome]:
        return [o for o in self.outcomes if o.outcome == "busy"]


def select_points(points: Sequence[GridPoint], indices: Optional[Sequence[int]]) -> list[GridPoint]:
    if indices is None:
        return list(points)
    chosen = []
    for index in indices:
        if not 0 <= index < len(points):
            raise IndexError(f"run index {index} is outside the grid (0..{len(points) - 1})")
        chosen.append(points[index])
    return chosen


def run_sweep(
    config: SweepConfig, indices: Optional[Sequence[int]] = None, echo: Callable[[str], None] = print
) -> SweepReport:
    """Run the points (all, or those at ``indices``) one after another; failures do not stop the sweep."""
    points = grid_points(config)
    chosen = select_points(points, indices)
    Path(config.output_root).mkdir(parents=True, exist_ok=True)
    write_config_snapshot(config)
    write_sweep_status(config, points)
    outcomes = []
    try:
        for point in chosen:
            outcomes.append(run_point(config, point, echo))
            write_sweep_status(config, points)
    finally:
        status = write_sweep_status(config, points)
    return SweepReport(outcomes, status)
