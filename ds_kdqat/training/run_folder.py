"""Ownership of an output folder: ds-kdqat writes only into folders it made, and one job at a time.

A folder becomes a *run folder* when ds-kdqat creates it (or finds it empty) and writes its marker::

    output_dir/
      .kdqat_run.json   marker: run id, creation time, the run's fingerprint, the history of config changes
      .kdqat.lock       present while a job runs in the folder: pid, host, process start time, run id

Rules (each refusal is an :class:`~ds_kdqat.errors.OutputFolderError`, exit status 2, nothing touched):

* a path that is a file, or a non-empty folder without the marker, is refused: it may hold the user's files;
* the *fingerprint* is the resolved config minus the keys that only shape logging (:func:`run_fingerprint`).
  A folder whose run has another fingerprint is refused with the differing keys listed, unless the user
  asks to ``overwrite`` (the old folder is renamed aside to ``<folder>.replaced-<time>``, never deleted, and
  a new run starts) or to ``resume_anyway`` (the new config is recorded in the marker's history);
* a folder whose lock names a live process is refused; a lock whose process is gone (same host, pid no
  longer running or reused by another process) is stale and taken over with a warning. A lock from another
  host cannot be checked from here: the message says which host and pid, and how to clear it.

A marker without a fingerprint (written by :func:`mark_output_dir`, e.g. by a sweep before its trainer
starts) is adopted by the first run.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..errors import OutputFolderError
from ..fileio import atomic_write_json

MARKER = ".kdqat_run.json"
LOCK = ".kdqat.lock"
KEY = "kdqat.output_dir"

# DeepSpeed keys that only decide what is printed or monitored, and our keys that do not change what is
# trained (checkpoints resume exactly, whatever their frequency; the folder may be moved).
LOGGING_ONLY_DEEPSPEED_KEYS = frozenset({
    "steps_per_print", "wall_clock_breakdown", "memory_breakdown", "dump_state", "tensorboard", "csv_monitor",
    "wandb", "comet", "flops_profiler", "comms_logger", "timers",
})
LOGGING_ONLY_KDQAT_KEYS = frozenset({
    "output_dir", "logging.log_every", "logging.save_every", "logging.keep_checkpoints", "logging.progress",
    "model.local_files_only",
    # bit-for-bit the same training with less memory: can be switched on to resume a run that ran out of memory
    "train.activation_checkpointing", "finetune.activation_checkpointing",
})
_SHOWN_ENTRIES = 8


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        for key in sorted(value):
            _flatten(value[key], f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = value
    return out


def run_fingerprint(resolved: dict[str, Any]) -> dict[str, Any]:
    """The config keys that decide what a run trains, as a flat ``{"dotted.key": value}`` dict.

    ``resolved`` is :meth:`~ds_kdqat.config.RunConfig.to_json`: DeepSpeed's keys plus ``"kdqat"``.
    """
    flat = _flatten(resolved, "", {})
    keep = {}
    for key, value in flat.items():
        top = key.split(".", 1)[0]
        if top == "kdqat":
            if key.split(".", 1)[1] in LOGGING_ONLY_KDQAT_KEYS:
                continue
        elif top in LOGGING_ONLY_DEEPSPEED_KEYS:
            continue
        keep[key] = value
    return keep


def fingerprint_changes(old: dict[str, Any], new: dict[str, Any],
                        defaults: Optional[dict[str, Any]] = None) -> list[str]:
    """``"key: old → new"`` for every key whose value differs (``(unset)`` for a missing one), sorted.

    ``defaults`` (a fingerprint of the default config): a key the old fingerprint lacks is no change when the
    new value is its default — the run was made by a version without that option, which behaved as its
    default does."""
    missing = "(unset)"
    defaults = defaults or {}
    lines = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, missing), new.get(key, missing)
        if before is missing and key in defaults and after == defaults[key]:
            continue
        if before != after:
            show = [v if v == missing else json.dumps(v) for v in (before, after)]
            lines.append(f"{key}: {show[0]} → {show[1]}")
    return lines


def _entries(folder: Path) -> list[str]:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    shown = ", ".join(names[:_SHOWN_ENTRIES])
    return [shown + (f", … ({len(names)} entries)" if len(names) > _SHOWN_ENTRIES else "")] if names else []


def _read_marker(folder: Path) -> Optional[dict]:
    path = folder / MARKER
    if not path.exists():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise OutputFolderError(KEY, f"{path}: unreadable ds-kdqat marker ({error}); the folder is left as it "
                                "is. Choose another kdqat.output_dir") from None
    if not isinstance(marker, dict) or "run_id" not in marker:
        raise OutputFolderError(KEY, f"{path}: not a ds-kdqat marker (no run_id); the folder is left as it is")
    return marker


def _new_marker(fingerprint: Optional[dict]) -> dict:
    return {"run_id": uuid.uuid4().hex, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "fingerprint": fingerprint, "history": []}


def mark_output_dir(path: str | os.PathLike) -> dict:
    """Make ``path`` a run folder (create it, or take it over when empty) and return its marker; an existing
    run folder is returned as it is. Refuses a file or a non-empty folder that is not a run folder."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise OutputFolderError(KEY, f"{folder} is a file, not a folder; choose a folder path")
    marker = _read_marker(folder) if folder.is_dir() else None
    if marker is not None:
        return marker
    if folder.is_dir() and any(folder.iterdir()):
        raise OutputFolderError(
            KEY, f"{folder} is not empty and was not created by ds-kdqat (no {MARKER}); it holds: "
            f"{_entries(folder)[0]}. ds-kdqat writes only into a new or empty folder, or into one of its own "
            "runs: choose another kdqat.output_dir (or --output_dir)")
    folder.mkdir(parents=True, exist_ok=True)
    marker = _new_marker(None)
    atomic_write_json(folder / MARKER, marker)
    return marker


# -- the lock ----------------------------------------------------------------------------------------------

def _process_start_time(pid: int) -> Optional[float]:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def _lock_record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": _process_start_time(os.getpid()),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _holder_alive(holder: dict) -> Optional[bool]:
    """True / False for a lock of this host; None when it belongs to another host (cannot be checked)."""
    if holder.get("host") != socket.gethostname():
        return None
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    started = _process_start_time(pid)
    if started is None:
        return False
    recorded = holder.get("started")
    # The pid was reused by another process when its start time differs from the recorded one.
    return not isinstance(recorded, (int, float)) or abs(started - recorded) < 1.0


def _read_lock(path: Path) -> dict:
    for _ in range(20):  # a lock file is written right after it is created: give the writer a moment
        try:
            holder = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(holder, dict):
                return holder
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return {"unreadable": True}


def acquire_lock(folder: Path) -> dict:
    """Create ``folder/.kdqat.lock`` for this process; take over a stale one. Returns the lock record."""
    path = folder / LOCK
    record = _lock_record()
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            if not holder:
                continue  # released between our two looks
            alive = _holder_alive(holder)
            if alive is False:
                warnings.warn(f"{path}: removing a stale lock of pid {holder.get('pid')} on "
                              f"{holder.get('host')} (that process is gone)", stacklevel=2)
                path.unlink(missing_ok=True)
                continue
            where = f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('since')})"
            hint = "" if alive else (f"; that host cannot be checked from here: if no ds-kdqat job runs there, "
                                     f"delete {path}")
            raise OutputFolderError(KEY, f"{folder} is in use by another ds-kdqat job: {where}{hint}. Wait for "
                                    "it to end, or choose another kdqat.output_dir")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(record, handle)
            handle.flush()
            os.fsync(handle.fileno())
        return record
    raise OutputFolderError(KEY, f"{path}: could not take the lock (other jobs keep starting in {folder})")


def release_lock(folder: Path) -> None:
    """Remove ``folder/.kdqat.lock`` when this process holds it (a lock of another process stays)."""
    path = folder / LOCK
    holder = _read_lock(path) if path.exists() else {}
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


# -- the whole claim ---------------------------------------------------------------------------------------

@dataclass
class RunFolder:
    """A claimed run folder: held locked by this process until :meth:`release`."""

    path: Path
    run_id: str
    resumed: bool
    moved_aside: Optional[Path] = None

    def release(self) -> None:
        release_lock(self.path)


# What a claim writes before any training: a folder holding only these has no run state to protect.
_CLAIM_FILES = frozenset({MARKER, LOCK, "config.json"})


def _has_run_state(folder: Path) -> bool:
    return any(p.name not in _CLAIM_FILES for p in folder.iterdir())


def _move_aside(folder: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = folder.with_name(f"{folder.name}.replaced-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{folder.name}.replaced-{stamp}-{n}")
    os.replace(folder, target)
    return target


def claim_run_folder(path: str | os.PathLike, fingerprint: dict[str, Any], *, overwrite: bool = False,
                     resume_anyway: bool = False, defaults: Optional[dict[str, Any]] = None) -> RunFolder:
    """Take ``path`` for a run with ``fingerprint``: mark it, lock it, and check that it holds the same run
    (see the module docstring; ``defaults`` as in :func:`fingerprint_changes`). Returns the claimed
    :class:`RunFolder`; the caller releases it."""
    if overwrite and resume_anyway:
        raise OutputFolderError(KEY, "--overwrite and --resume-anyway exclude each other")
    folder = Path(path)
    mark_output_dir(folder)
    acquire_lock(folder)
    try:
        marker = _read_marker(folder)
        assert marker is not None
        old = marker.get("fingerprint")
        moved = None
        if old is None:
            resumed = False
            marker["fingerprint"] = fingerprint
        elif not fingerprint_changes(old, fingerprint, defaults):
            resumed = True
        elif not _has_run_state(folder):
            # Nothing was trained under the old config (an input error stopped it): just take the new one.
            resumed = False
            marker["fingerprint"] = fingerprint
        else:
            changes = fingerprint_changes(old, fingerprint, defaults)
            if overwrite:
                release_lock(folder)
                moved = _move_aside(folder)
                release_lock(moved)
                mark_output_dir(folder)
                acquire_lock(folder)
                marker = _read_marker(folder)
                marker["fingerprint"] = fingerprint
                resumed = False
            elif resume_anyway:
                marker["history"] = list(marker.get("history", [])) + [
                    {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "changes": changes}]
                marker["fingerprint"] = fingerprint
                resumed = True
            else:
                listed = "\n  ".join(changes)
                raise OutputFolderError(
                    KEY, f"{folder} holds a run with another config; changed keys:\n  {listed}\n"
                    "Nothing was changed. Choose another kdqat.output_dir, or pass --overwrite (the old run is "
                    f"moved to {folder.name}.replaced-<time> and a new one starts) or --resume-anyway (go on "
                    "from the old run's checkpoints with the new config)")
        atomic_write_json(folder / MARKER, marker)
        return RunFolder(folder, marker["run_id"], resumed, moved)
    except BaseException:
        release_lock(folder)
        raise
