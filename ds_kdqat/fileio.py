"""Atomic file writes and hashing: the one implementation every module that writes files uses."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import warnings
from pathlib import Path
from typing import Callable, Union

PathLike = Union[str, "os.PathLike[str]"]


def atomic_write_via(path: PathLike, write: Callable[[str], None]) -> Path:
    """Let ``write(tmp)`` write a file at a temporary path, then put it at ``path`` atomically.

    For writers that take a path (safetensors ``save_file``, matplotlib ``savefig``, a streamed copy):
    ``tmp`` is a new empty file ``.<name>.<pid>.<random>.tmp`` in ``path``'s directory (same file system),
    created with the umask's mode as a plain ``open(path, "w")`` would; ``write`` may truncate and rewrite
    it. Afterwards the file is flushed to disk (fsync) and renamed over ``path`` with ``os.replace``, so
    readers see either the old file or the whole new one. If ``write`` or a later step raises, the
    temporary file is removed and ``path`` is left as it was. Parent directories are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(str(tmp))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one
    (:func:`atomic_write_via`: same-directory temporary file, fsync, ``os.replace``)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    return atomic_write_via(path, write)


def atomic_write_text(path: PathLike, text: str) -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8 (newlines written as given)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, data) -> Path:
    """:func:`atomic_write_text` of ``data`` as indented, key-sorted JSON with a final newline."""
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def sha256_file(path: PathLike) -> str:
    """Hex SHA-256 of the file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def aside_path(folder: str, kind: str) -> str:
    """The hidden sibling ``.<name>.kdqat-<kind>`` of ``folder``: names only ds-kdqat makes, so that what
    it removes as a leftover is its own."""
    parent, name = os.path.split(os.path.normpath(folder))
    return os.path.join(parent, f".{name}.kdqat-{kind}")


def temp_dir(folder: str) -> str:
    """Where a new version of ``folder`` is written before :func:`replace_dir` puts it in place."""
    return aside_path(folder, "tmp")


def replace_dir(new: str, folder: str) -> None:
    """Put directory ``new`` in place of ``folder`` (both ds-kdqat's). The old one is moved aside first
    and removed last, so at every moment one complete copy exists: ``folder`` or, in the instant between
    the renames, its hidden ``.kdqat-old`` sibling (which :func:`saved_dir` falls back to). Entries of the
    old folder that the new one lacks (a note the user put there) are carried over, never deleted."""
    old = aside_path(folder, "old")
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(folder):
        os.replace(folder, old)
        kept = sorted(set(os.listdir(old)) - set(os.listdir(new)))
        for name in kept:
            os.replace(os.path.join(old, name), os.path.join(new, name))
        if kept:
            warnings.warn(f"{folder}: kept {', '.join(kept)} (not written by ds-kdqat) in the new version",
                          stacklevel=2)
    os.replace(new, folder)
    shutil.rmtree(old, ignore_errors=True)


def saved_dir(folder: str) -> str:
    """``folder``, or its moved-aside copy when a kill fell between the two renames of :func:`replace_dir`."""
    old = aside_path(folder, "old")
    return folder if os.path.isdir(folder) or not os.path.isdir(old) else old
