"""Atomic writes: the whole new file or the old one, no temporary left behind, mode from the umask."""

import hashlib
import json
import os
import stat

import pytest

from ds_kdqat.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text, atomic_write_via, sha256_file


def test_writes_replace_the_file_and_leave_no_temporary(tmp_path):
    path = tmp_path / "sub" / "a.json"
    atomic_write_json(path, {"b": 1, "a": 0.5})
    assert path.read_text() == '{\n  "a": 0.5,\n  "b": 1\n}\n'
    atomic_write_text(path, "new\n")
    assert path.read_bytes() == b"new\n"
    atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01" and os.listdir(path.parent) == ["a.json"]
    assert sha256_file(path) == hashlib.sha256(b"\x00\x01").hexdigest()


def test_via_a_path_taking_writer(tmp_path):
    path = tmp_path / "out.bin"
    seen = []

    def write(tmp):
        seen.append(tmp)
        assert os.path.dirname(tmp) == str(tmp_path) and os.path.isfile(tmp) and not path.exists()
        with open(tmp, "w") as fh:
            json.dump([1, 2], fh)

    assert atomic_write_via(path, write) == path
    assert json.loads(path.read_text()) == [1, 2] and not os.path.exists(seen[0])
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "keep.txt"
    path.write_text("old")

    def fail(tmp):
        with open(tmp, "w") as fh:
            fh.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write_via(path, fail)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["keep.txt"]
