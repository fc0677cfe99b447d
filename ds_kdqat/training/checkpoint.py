"""Resumable checkpoints on top of DeepSpeed's: verified on load, with fallback to the previous good one.

Layout of a stage's checkpoint folder::

    ckpt/
      latest                  name of the newest complete checkpoint (replaced atomically, written last)
      step_00000120/          DeepSpeed's model / optimizer / scheduler states (any ZeRO stage, every rank)
        kdqat_state.json      our loop state: micro-batch counter, best metric, …
        kdqat_tensors.pt      tensors outside DeepSpeed's states (LAT second moments), when there are any
        rng_rank{r}.pt        Python, NumPy and torch RNG states of rank r (tensors and plain values only:
                              readable with ``torch.load(..., weights_only=True)``; see :func:`rng_record`)
        kdqat_manifest.json   {"format": 1, "files": [{"path", "size", "sha256"}, …]}: every other file
                              under the tag folder (relative paths with "/"), written by rank 0 after all
                              ranks finished writing, and before ``latest``

Save order: DeepSpeed's files and ours (every rank) → barrier → manifest → ``latest`` → prune. A kill at any
moment leaves the previous checkpoint in force.

Load: the candidates are the tag named in ``latest``, then the other ``step_*`` folders newest first. A
candidate is *good* when its manifest parses, every listed file exists with the listed size and sha256, and
its ``kdqat_state.json`` is an object with an integer ``micro``. The first good candidate is loaded; when it
is not the one ``latest`` names, a warning names each file that failed and why. Rank 0 decides and
broadcasts the tag, so every rank loads the same one. When checkpoints exist but none is good, a
:class:`~ds_kdqat.errors.DataError` says what was wrong with each (never a silent restart from step 0).
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import warnings
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ..errors import DataError
from ..fileio import atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_file

LATEST = "latest"
MANIFEST = "kdqat_manifest.json"
STATE = "kdqat_state.json"
TENSORS = "kdqat_tensors.pt"
MANIFEST_FORMAT = 1
RNG_FORMAT = 1
_TAG = re.compile(r"step_(\d+)")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped because it failed verification; the message names the file and why."""


def _tag(step: int) -> str:
    return f"step_{step:08d}"


def _rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


# -- RNG state as tensors and plain values -----------------------------------------------------------------

def rng_record(state: dict) -> dict:
    """The RNG states of :func:`rng_state` as tensors, ints, floats, strings and None only (no numpy, no
    tuples), so that ``torch.load(weights_only=True)`` reads them back::

        {"format": 1,
         "python": {"version": int, "internal": int64 tensor (625,), "gauss_next": float | None},
         "numpy":  {"bit_generator": "MT19937", "key": int64 tensor (624,), "pos": int,
                    "has_gauss": int, "cached_gaussian": float},
         "torch":  uint8 tensor,
         "cuda":   [uint8 tensor per device] | None}
    """
    version, internal, gauss_next = state["python"]
    name, key, pos, has_gauss, cached = state["numpy"]
    return {
        "format": RNG_FORMAT,
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": None if gauss_next is None else float(gauss_next)},
        "numpy": {"bit_generator": str(name), "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": state["torch"],
        "cuda": None if state.get("cuda") is None else list(state["cuda"]),
    }


def rng_from_record(record: dict) -> dict:
    """Inverse of :func:`rng_record`: the tuples and arrays that ``random``/``numpy``/``torch`` accept."""
    if record.get("format") != RNG_FORMAT:
        raise ValueError(f"unknown RNG record format {record.get('format')!r} (expected {RNG_FORMAT})")
    py, nps = record["python"], record["numpy"]
    return {
        "python": (py["version"], tuple(int(x) for x in py["internal"].tolist()), py["gauss_next"]),
        "numpy": (nps["bit_generator"], nps["key"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"],
                  nps["cached_gaussian"]),
        "torch": record["torch"],
        "cuda": record["cuda"],
    }


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# -- manifest ----------------------------------------------------------------------------------------------

def _files_under(root: str) -> list[str]:
    """Relative paths ("/"-separated, sorted) of every file under ``root``, the manifest excluded."""
    found = []
    for parent, dirs, files in os.walk(root):
        dirs.sort()
        for name in files:
            rel = os.path.relpath(os.path.join(parent, name), root).replace(os.sep, "/")
            if rel != MANIFEST:
                found.append(rel)
    return sorted(found)


def build_manifest(root: str) -> dict:
    """Size and sha256 of every file under the tag folder ``root`` (each file read once)."""
    files = []
    for rel in _files_under(root):
        path = os.path.join(root, *rel.split("/"))
        files.append({"path": rel, "size": os.path.getsize(path), "sha256": sha256_file(path)})
    return {"format": MANIFEST_FORMAT, "files": files}


def _parse_manifest(path: str) -> list[dict]:
    """The file entries of the manifest at ``path``; ValueError saying what is malformed."""
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"not a format-{MANIFEST_FORMAT} manifest object")
    entries = data.get("files")
    if not isinstance(entries, list):
        raise ValueError("'files' is not a list")
    for entry in entries:
        rel = entry.get("path") if isinstance(entry, dict) else None
        if (not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel
                or any(part in ("", ".", "..") for part in rel.split("/"))):
            raise ValueError(f"bad file entry {entry!r}")
        size, digest = entry.get("size"), entry.get("sha256")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"{rel}: bad size {size!r}")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise ValueError(f"{rel}: bad sha256 {digest!r}")
    return entries


def read_state(path: str) -> dict:
    """Our loop state at ``path``: a JSON object with an integer ``micro``; ValueError otherwise."""
    with open(path, encoding="utf-8") as handle:
        state = json.load(handle)
    if not isinstance(state, dict):
        raise ValueError("not a JSON object")
    micro = state.get("micro")
    if isinstance(micro, bool) or not isinstance(micro, int):
        raise ValueError(f"'micro' is {micro!r}, not an integer")
    return state


def check_tag(folder: str, tag: str) -> Optional[str]:
    """None when checkpoint ``tag`` under ``folder`` is good (module docstring), else "<file>: <why>".

    Reads every byte of the checkpoint: sizes are checked first (cheap), then the sha256 of each file."""
    root = os.path.join(folder, tag)
    if not os.path.isdir(root):
        return f"{root}: the folder does not exist"
    manifest = os.path.join(root, MANIFEST)
    if not os.path.isfile(manifest):
        return f"{manifest}: no manifest (written by an older ds-kdqat?, or the save was interrupted)"
    try:
        entries = _parse_manifest(manifest)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        return f"{manifest}: unreadable manifest ({error})"
    if STATE not in {entry["path"] for entry in entries}:
        return f"{manifest}: does not list {STATE}"
    paths = [os.path.join(root, *entry["path"].split("/")) for entry in entries]
    for entry, path in zip(entries, paths):
        if not os.path.isfile(path):
            return f"{path}: listed in the manifest but missing"
        size = os.path.getsize(path)
        if size != entry["size"]:
            return f"{path}: {size} bytes, the manifest says {entry['size']} (truncated or overwritten)"
    for entry, path in zip(entries, paths):
        if sha256_file(path) != entry["sha256"]:
            return f"{path}: sha256 differs from the manifest (the file is corrupt)"
    state = os.path.join(root, STATE)
    try:
        read_state(state)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        return f"{state}: bad loop state ({error})"
    return None


# -- choosing a checkpoint ---------------------------------------------------------------------------------

def _step_tags(folder: str) -> list[str]:
    """The ``step_<n>`` folders under ``folder``, newest (largest n) first."""
    if not os.path.isdir(folder):
        return []
    tags = [t for t in os.listdir(folder) if _TAG.fullmatch(t) and os.path.isdir(os.path.join(folder, t))]
    return sorted(tags, key=lambda t: int(_TAG.fullmatch(t).group(1)), reverse=True)


def _read_latest(folder: str) -> Optional[str]:
    """The text of ``folder/latest`` (stripped), or None when there is no such file."""
    path = os.path.join(folder, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8", errors="replace") as handle:
        return handle.read().strip()


def latest_tag(folder: str) -> Optional[str]:
    """The tag ``latest`` names when that folder exists (no verification; see :func:`choose_tag`)."""
    tag = _read_latest(folder)
    if tag and os.path.basename(tag) == tag and os.path.isdir(os.path.join(folder, tag)):
        return tag
    return None


def choose_tag(folder: str) -> tuple[Optional[str], list[str]]:
    """(the newest good tag or None, a "<file>: <why>" line per candidate rejected before it).

    Candidates: the tag in ``latest``, then the other ``step_*`` folders newest first."""
    problems = []
    named = _read_latest(folder)
    candidates = []
    if named is not None:
        if not named or os.path.basename(named) != named or named in (".", ".."):
            problems.append(f"{os.path.join(folder, LATEST)}: names {named!r}, not a checkpoint folder")
        else:
            candidates.append(named)
    elif _step_tags(folder):
        problems.append(f"{os.path.join(folder, LATEST)}: missing")
    candidates += [t for t in _step_tags(folder) if t != named]
    for tag in candidates:
        problem = check_tag(folder, tag)
        if problem is None:
            return tag, problems
        problems.append(problem)
    return None, problems


def _has_checkpoints(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, LATEST)) or bool(_step_tags(folder))


def _decide(folder: str, rank: int) -> tuple[Optional[str], Optional[str]]:
    """(tag to load, None) or (None, error message); decided on rank 0 and broadcast to all ranks."""
    decision: list = [None, None]
    if rank == 0:
        tag, problems = choose_tag(folder)
        if tag is None:
            decision[1] = ("no good checkpoint: " + "; ".join(problems)
                           + f". Delete the folder {folder} to restart this stage from step 0.")
        else:
            decision[0] = tag
            if problems:
                warnings.warn("skipped checkpoint(s): " + "; ".join(problems) + f"; resuming from {tag} instead",
                              CheckpointWarning, stacklevel=3)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(decision, src=0)
    return decision[0], decision[1]


# -- save / prune / load -----------------------------------------------------------------------------------

def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(engine, folder: str, step: int, state: dict, rank: int, keep: int,
         tensors: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Collective: every rank calls it. Writes DeepSpeed's states and ours, then the manifest, then ``latest``.

    ``tensors``: state that lives outside the engine and is the same on every rank (saved by rank 0)."""
    tag = _tag(step)
    root = os.path.join(folder, tag)
    if rank == 0 and os.path.isdir(root) and tag != latest_tag(folder):
        shutil.rmtree(root)  # left by an interrupted save or a checkpoint skipped on load: start clean
    _barrier()
    engine.save_checkpoint(folder, tag=tag, save_latest=False)
    atomic_write_bytes(os.path.join(root, _rng_file(rank)), _torch_bytes(rng_record(rng_state())))
    if rank == 0:
        if tensors:
            atomic_write_bytes(os.path.join(root, TENSORS), _torch_bytes(tensors))
        atomic_write_json(os.path.join(root, STATE), state)
    _barrier()
    if rank == 0:
        atomic_write_json(os.path.join(root, MANIFEST), build_manifest(root))
        atomic_write_text(os.path.join(folder, LATEST), tag)
        _prune(folder, keep)
    _barrier()


def _prune(folder: str, keep: int) -> None:
    """Keep the ``keep`` newest checkpoints up to the one ``latest`` names; delete older ones, and newer ones
    (left from before a fallback to an older checkpoint, or by an interrupted save). Never deletes ``latest``'s."""
    current = latest_tag(folder)
    if current is None:
        return
    tags = _step_tags(folder)  # newest first
    position = tags.index(current)
    for tag in tags[:position] + tags[position + keep:]:
        shutil.rmtree(os.path.join(folder, tag), ignore_errors=True)


def _load_file(path: str, what: str, reader):
    try:
        return reader(path)
    except Exception as error:  # noqa: BLE001 - any failure is reported naming the file
        raise DataError(source=path, message=f"cannot read {what} ({type(error).__name__}: {error})") from error


def load(engine, folder: str, rank: int) -> tuple[Optional[dict], dict[str, torch.Tensor]]:
    """Collective. Restore the newest good checkpoint into ``engine`` and this process's RNG.

    Returns (our loop state, the saved ``tensors``), or (None, {}) when ``folder`` holds no checkpoint.
    Raises DataError when there are checkpoints but none is good, or when DeepSpeed fails on the chosen one
    (no fallback then: the engine may be partly loaded)."""
    if not _has_checkpoints(folder):
        return None, {}
    tag, error = _decide(folder, rank)
    if tag is None:
        raise DataError(source=folder, message=error)
    root = os.path.join(folder, tag)
    try:
        load_path, _ = engine.load_checkpoint(folder, tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    except Exception as failure:  # noqa: BLE001 - reported naming the folder
        raise DataError(source=root, message=(
            f"DeepSpeed could not load this checkpoint ({type(failure).__name__}: {failure}); not falling back, "
            f"the engine may be partly loaded. Delete the folder {root} to resume from the previous checkpoint."
        )) from failure
    if load_path is None:
        raise DataError(source=root, message="DeepSpeed found no model states for this rank in the checkpoint")
    state = _load_file(os.path.join(root, STATE), "the loop state", read_state)
    rng_path = os.path.join(root, _rng_file(rank))
    if os.path.exists(rng_path):
        record = _load_file(rng_path, "the RNG state", lambda p: rng_from_record(torch.load(p, weights_only=True)))
        set_rng_state(record)
    tensors_path = os.path.join(root, TENSORS)
    tensors = (_load_file(tensors_path, "the saved tensors", lambda p: torch.load(p, weights_only=True))
               if os.path.exists(tensors_path) else {})
    return state, tensors
