"""Run folders in-process: the fingerprint, its changes, marking, locking (see tests/test_output_safety.py for
the same rules through the trainer)."""

from __future__ import annotations

import json
import os
import socket

import pytest

from ds_kdqat.errors import OutputFolderError
from ds_kdqat.training.run_folder import (
    LOCK, MARKER, acquire_lock, claim_run_folder, fingerprint_changes, mark_output_dir, release_lock,
    run_fingerprint)


def test_fingerprint_keeps_what_is_trained_and_drops_logging_keys():
    resolved = {
        "train_micro_batch_size_per_gpu": 8, "steps_per_print": 10, "tensorboard": {"enabled": True},
        "zero_optimization": {"stage": 2},
        "kdqat": {"output_dir": "o", "seed": 1, "logging": {"log_every": 5, "eval_every": 3},
                  "distill": {"recipe": "map", "weights": {}}},
    }
    assert run_fingerprint(resolved) == {
        "train_micro_batch_size_per_gpu": 8, "zero_optimization.stage": 2, "kdqat.seed": 1,
        "kdqat.logging.eval_every": 3, "kdqat.distill.recipe": "map", "kdqat.distill.weights": {}}


def test_changes_are_listed_and_an_option_added_later_at_its_default_is_none():
    old = {"kdqat.seed": 1, "kdqat.distill.recipe": "ternarybert"}
    new = {"kdqat.seed": 1, "kdqat.distill.recipe": "map", "kdqat.quant.new_option": 0.5, "kdqat.extra": 2}
    defaults = {"kdqat.quant.new_option": 0.5, "kdqat.extra": 1}
    assert fingerprint_changes(old, new, defaults) == [
        'kdqat.distill.recipe: "ternarybert" → "map"', "kdqat.extra: (unset) → 2"]
    assert fingerprint_changes(old, {**old, "kdqat.quant.new_option": 0.5}, defaults) == []


def test_mark_refuses_a_file_and_a_foreign_folder_and_adopts_an_empty_one(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputFolderError, match="is a file"):
        mark_output_dir(tmp_path / "file")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    for i in range(10):
        (foreign / f"f{i}.txt").write_text("x")
    with pytest.raises(OutputFolderError, match=r"holds: f0\.txt, .*f7\.txt, … \(10 entries\)"):
        mark_output_dir(foreign)
    assert not (foreign / MARKER).exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    marker = mark_output_dir(empty)
    assert marker["fingerprint"] is None and mark_output_dir(empty)["run_id"] == marker["run_id"]


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    record = acquire_lock(tmp_path)
    assert record["pid"] == os.getpid()
    with pytest.raises(OutputFolderError, match=f"in use by another ds-kdqat job: pid {os.getpid()}"):
        acquire_lock(tmp_path)
    release_lock(tmp_path)
    assert not (tmp_path / LOCK).exists()
    # a pid that cannot be running (above the kernel's pid_max), on this host: stale
    (tmp_path / LOCK).write_text(json.dumps({"pid": 2**22 + 7, "host": socket.gethostname(), "started": 1.0}))
    with pytest.warns(UserWarning, match="removing a stale lock"):
        acquire_lock(tmp_path)
    release_lock(tmp_path)
    # another host's lock is never broken
    (tmp_path / LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "t"}))
    with pytest.raises(OutputFolderError, match=f"that host cannot be checked from here: .*delete {tmp_path / LOCK}"):
        acquire_lock(tmp_path)
    release_lock(tmp_path)  # not ours: stays
    assert (tmp_path / LOCK).exists()


def test_claim_takes_a_new_config_when_nothing_was_trained_yet(tmp_path):
    folder = claim_run_folder(tmp_path / "out", {"kdqat.lr": 1})
    (tmp_path / "out" / "config.json").write_text("{}")
    folder.release()
    # only the marker and config.json: an input error stopped the first try; the fixed config just goes on
    again = claim_run_folder(tmp_path / "out", {"kdqat.lr": 2})
    assert not again.resumed
    (tmp_path / "out" / "log.csv").write_text("step,phase,split\n")
    again.release()
    with pytest.raises(OutputFolderError, match="kdqat.lr: 2 → 3"):
        claim_run_folder(tmp_path / "out", {"kdqat.lr": 3})
    assert not (tmp_path / "out" / LOCK).exists()  # released on refusal
