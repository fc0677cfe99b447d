"""ds-kdqat never loses a user's files: run folders, data folders, config changes, locks, clear refusals.

Each case runs the real trainer (run/train.py) on a tiny BERT with a short schedule and asserts the exit
code, the message, and that every file the user had is byte-identical afterwards.
"""

from __future__ import annotations

import csv
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.tiny import REPO, make_task_dir, make_tiny_bert, run_train, train_env, write_config

SHORT = {
    "finetune": {"epochs": 1, "learning_rate": 2e-3, "max_steps": 4},
    "train": {"epochs": 1, "learning_rate": 5e-4, "max_steps": 6},
    "logging": {"log_every": 2, "save_every": 2, "eval_every": 2, "progress": False},
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return make_tiny_bert(root / "bert"), make_task_dir(root / "task")


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def log_without_timings(out: Path) -> list[dict]:
    """log.csv's rows without the wall-clock column (the only one a resumed run may change)."""
    with open(out / "log.csv", newline="") as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


def short_config(path: Path, model: Path, data: Path, out: Path, **changes) -> Path:
    kdqat = {key: dict(value) for key, value in SHORT.items()}
    for key, value in changes.items():
        kdqat[key] = value
    return write_config(path, model, data, out, **kdqat)


@pytest.fixture(scope="module")
def finished(assets, tmp_path_factory):
    """A complete short run; tests copy its folder before changing anything."""
    model, data = assets
    root = tmp_path_factory.mktemp("finished")
    config = short_config(root / "c.json", model, data, root / "out")
    run_train(config)
    return root / "out", config


def copy_run(finished, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the finished run whose config names the copy's folder."""
    out, config = finished
    mine = tmp_path / "out"
    shutil.copytree(out, mine)
    spec = json.loads(config.read_text())
    spec["kdqat"]["output_dir"] = str(mine)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(spec))
    return mine, path


def test_a_non_empty_folder_ds_kdqat_did_not_make_is_refused_untouched(assets, tmp_path):
    """Case 1: the user's own model in U/teacher, notes in U/student; output_dir=U and teacher=U/teacher."""
    model, data = assets
    users = tmp_path / "U"
    shutil.copytree(model, users / "teacher")
    (users / "student").mkdir()
    (users / "student" / "NOTES.md").write_text("my notes\n")
    before = snapshot(users)
    config = short_config(tmp_path / "c.json", users / "teacher", data, users)
    result = run_train(config, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"ds-kdqat output folder error: kdqat.output_dir: {users} is not empty and was not created by " \
           "ds-kdqat" in result.stderr
    assert "student/, teacher/" in result.stderr
    assert snapshot(users) == before


def test_the_embedded_task_reads_a_users_data_dir_and_never_writes_it(assets, tmp_path):
    """Case 2: task rt_polarity with data_dir=U trains on U's own split and leaves it byte-identical."""
    model, _ = assets
    users = make_task_dir(tmp_path / "U", n_train=40, n_dev=16, seed=3)
    (users / "README.txt").write_text("my data\n")
    before = snapshot(users)
    config = short_config(tmp_path / "c.json", model, users, tmp_path / "out")
    spec = json.loads(config.read_text())
    spec["kdqat"]["data"]["task"] = "rt_polarity"
    config.write_text(json.dumps(spec))
    run_train(config)
    assert snapshot(users) == before
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["task"] == "rt_polarity"


def test_a_changed_config_is_refused_with_the_changed_keys(finished, tmp_path):
    """Case 3: a finished folder re-run with recipe=map and another learning rate trains nothing."""
    out, config = copy_run(finished, tmp_path)
    before = snapshot(out)
    result = run_train(config, "--set", "kdqat.distill.recipe=map", "--set", "kdqat.train.learning_rate=0.01",
                       check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"{out} holds a run with another config; changed keys:" in result.stderr
    assert 'kdqat.distill.recipe: "ternarybert" → "map"' in result.stderr
    assert "kdqat.train.learning_rate: 0.0005 → 0.01" in result.stderr
    assert snapshot(out) == before
    # pure logging keys are not part of the run: changing them resumes (nothing left to train here)
    run_train(config, "--set", "kdqat.logging.log_every=3", "--set", "steps_per_print=7")
    assert (out / "log.csv").read_bytes() == before["log.csv"]


def test_overwrite_moves_the_old_run_aside_and_resume_anyway_records_the_change(finished, tmp_path):
    out, config = copy_run(finished, tmp_path)
    before = snapshot(out)
    run_train(config, "--set", "kdqat.train.max_steps=8", "--resume-anyway")
    marker = json.loads((out / ".kdqat_run.json").read_text())
    assert marker["history"][-1]["changes"] == ["kdqat.train.max_steps: 6 → 8"]
    assert marker["fingerprint"]["kdqat.train.max_steps"] == 8
    results = json.loads((out / "results.json").read_text())
    assert results["steps"]["kdqat"] == 8  # went on from step 6 of the old run

    after_resume = snapshot(out)
    run_train(config, "--set", "kdqat.distill.recipe=map", "--overwrite")
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("out.replaced-")]
    assert len(moved) == 1
    # the old run is kept whole, lock released, nothing lost
    assert snapshot(moved[0]) == after_resume
    assert before["results.json"] != after_resume["results.json"]
    fresh = json.loads((out / "results.json").read_text())
    assert fresh["steps"]["kdqat"] == 6
    assert json.loads((out / ".kdqat_run.json").read_text())["fingerprint"]["kdqat.distill.recipe"] == "map"
    assert not (out / ".kdqat.lock").exists()


def test_a_deleted_or_damaged_teacher_is_fine_tuned_again(finished, tmp_path):
    """Case 4: teacher/ deleted between stages, or its weights gone: the next run rebuilds it."""
    out, config = copy_run(finished, tmp_path)
    teacher_before = snapshot(out / "teacher")
    results_before = json.loads((out / "results.json").read_text())
    shutil.rmtree(out / "teacher")
    result = run_train(config)
    assert "the fine-tuned teacher" in result.stderr and "starts again from step 0" in result.stderr
    assert snapshot(out / "teacher") == teacher_before  # the same seed fine-tunes the same teacher
    assert json.loads((out / "results.json").read_text())["teacher"] == results_before["teacher"]

    (out / "teacher" / "model.safetensors").unlink()
    result = run_train(config)
    assert f"{out / 'teacher' / 'model.safetensors'} is missing" in result.stderr
    assert snapshot(out / "teacher") == teacher_before
    finetune_rows = [line for line in (out / "log.csv").read_text().splitlines() if ",finetune:" in line]
    assert len(finetune_rows) == len(set(finetune_rows))  # no duplicated rows from the restarts


def _popen(config: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "run" / "train.py"), "--ds_config", str(config), *extra],
                            env=train_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_one_job_per_folder_and_stale_locks_are_taken_over(assets, tmp_path):
    """Case 5: a second trainer in a busy folder is refused by name; a dead job's lock does not block."""
    model, data = assets
    out = tmp_path / "out"
    config = short_config(tmp_path / "c.json", model, data, out,
                          train={"epochs": 50, "learning_rate": 5e-4, "max_steps": 400})
    first = _popen(config)
    try:
        lock = out / ".kdqat.lock"
        deadline = time.time() + 120
        while not (lock.exists() and (out / "checkpoints").exists()) and time.time() < deadline:
            assert first.poll() is None, first.stderr.read()[-3000:]
            time.sleep(0.05)
        holder = json.loads(lock.read_text())
        assert holder["pid"] == first.pid
        second = run_train(config, check=False)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"{out} is in use by another ds-kdqat job: pid {first.pid} on host {socket.gethostname()}" \
            in second.stderr
    finally:
        first.kill()
        first.wait()
    # SIGKILL left the lock behind; its process is gone, so the next run takes it over and finishes
    assert json.loads((out / ".kdqat.lock").read_text())["pid"] == first.pid
    result = run_train(config, "--set", "kdqat.train.max_steps=16", "--resume-anyway", check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"removing a stale lock of pid {first.pid}" in result.stderr
    assert not (out / ".kdqat.lock").exists()


@pytest.mark.parametrize("case", ["too_long_sequences", "unknown_model_type", "missing_teacher", "non_model_teacher", "output_is_a_file", "users_log_csv",
                                  "broken_log_in_a_run_folder"])
def test_clear_refusals_touch_nothing(case, assets, tmp_path):
    """Case 10: each mistake stops with exit 2 and a message naming what is wrong; the user's files stay."""
    model, data = assets
    out = tmp_path / "out"
    teacher = model
    if case == "too_long_sequences":  # case 9: the tiny BERT has 64 positions
        data = tmp_path / "data"
        shutil.copytree(assets[1], data)
        expected = "kdqat.data.max_seq_length: got 4096; the bert model takes at most 64 tokens"
    elif case == "unknown_model_type":
        teacher = tmp_path / "odd_model"
        teacher.mkdir()
        (teacher / "config.json").write_text(json.dumps({"model_type": "xyz"}))
        expected = f"kdqat.model.teacher: {teacher / 'config.json'} cannot be read: "
    elif case == "missing_teacher":
        teacher, expected = tmp_path / "no_such_model", f"kdqat.model.teacher: {tmp_path / 'no_such_model'}: no such folder"
    elif case == "non_model_teacher":
        teacher = tmp_path / "notes"
        teacher.mkdir()
        (teacher / "a.txt").write_text("x")
        expected = "folder without config.json: not a Hugging Face model folder"
    elif case == "output_is_a_file":
        out = tmp_path / "results.txt"
        out.write_text("my results\n")
        expected = f"kdqat.output_dir: {out} is a file, not a folder"
    elif case == "users_log_csv":
        out.mkdir()
        (out / "log.csv").write_text("epoch,loss\n1,0.5\n")
        expected = f"{out} is not empty and was not created by ds-kdqat"
    else:
        out.mkdir()
        (out / ".kdqat_run.json").write_text(json.dumps({"run_id": "x", "fingerprint": None, "history": []}))
        (out / "log.csv").write_text("epoch,loss\n1,0.5\n")
        expected = f"ds-kdqat data error: {out / 'log.csv'}: not a ds-kdqat run log"
    watched = tmp_path
    config = short_config(tmp_path / "c.json", teacher, data, out)
    if case == "too_long_sequences":
        spec = json.loads(config.read_text())
        spec["kdqat"]["data"]["max_seq_length"] = 4096
        config.write_text(json.dumps(spec))
    before = snapshot(watched)
    result = run_train(config, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    after = snapshot(watched)
    for name, content in before.items():
        if name.startswith("out/") and case == "broken_log_in_a_run_folder" and name != "out/log.csv":
            continue  # ds-kdqat's own marker and config in its own run folder
        assert after[name] == content, name
    if case in ("too_long_sequences", "unknown_model_type", "missing_teacher", "non_model_teacher"):
        assert not out.exists()  # refused before any folder was made
    assert not any(name.endswith(".kdqat.lock") for name in after)


def test_a_corrupt_newest_checkpoint_is_skipped_and_resume_stays_exact(finished, tmp_path):
    """Case 7: 1 KiB overwritten (0xA5 bytes) inside the newest KD-QAT checkpoint's model states: the run says which
    file, resumes from the previous checkpoint and ends with the uninterrupted run's numbers and log."""
    out, config = copy_run(finished, tmp_path)
    kdqat = out / "checkpoints" / "kdqat"
    assert (kdqat / "latest").read_text() == "step_00000006"
    states = kdqat / "step_00000006" / "mp_rank_00_model_states.pt"
    data = bytearray(states.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 1024] = b"\xa5" * 1024  # not zeros: untouched Adam moments there are zeros already
    states.write_bytes(bytes(data))
    reference_log = log_without_timings(out)
    reference_results = json.loads((out / "results.json").read_text())
    result = run_train(config)
    assert f"{states}: sha256 differs from the manifest" in result.stderr
    assert "resuming from step_00000004 instead" in result.stderr
    # steps 5 and 6 were trained again: their log rows were dropped and written anew, identical
    assert log_without_timings(out) == reference_log
    assert (kdqat / "latest").read_text() == "step_00000006"
    ours = json.loads((out / "results.json").read_text())
    assert ours["student"] == reference_results["student"] and ours["steps"] == reference_results["steps"]

    (kdqat / "latest").write_text("step_00000099")  # a tag naming a missing step
    result = run_train(config)
    assert f"{kdqat / 'step_00000099'}: the folder does not exist" in result.stderr
    assert log_without_timings(out) == reference_log


@pytest.mark.parametrize("override, expected", [
    ('zero_optimisation={"stage": 1}', "zero_optimisation: unknown DeepSpeed key; did you mean 'zero_optimization'?"),
    ("gradient_acumulation_steps=2", "did you mean 'gradient_accumulation_steps'?"),
    ("kdqat.train.learning_rate=NaN", "kdqat.train.learning_rate"),
    ("kdqat.finetune.epochs=Infinity", "kdqat.finetune.epochs"),
    ("kdqat.seed=-1", "kdqat.seed"),
])
def test_config_mistakes_stop_before_anything_is_made(override, expected, assets, tmp_path):
    """Case 8: DeepSpeed-key typos and non-finite or out-of-range numbers stop with exit 2, nothing written."""
    model, data = assets
    config = short_config(tmp_path / "c.json", model, data, tmp_path / "out")
    result = run_train(config, "--set", override, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "ds-kdqat config error: " in result.stderr and expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_sigterm_outside_the_training_loop_exits_143_and_releases_the_folder(assets, tmp_path):
    """SIGTERM while the job loads (folder claimed, no training step yet) ends it with 143 through its
    ``finally`` blocks: the lock is released, no temporary file is left, and the next run finishes."""
    model, data = assets
    out = tmp_path / "out"
    config = short_config(tmp_path / "c.json", model, data, out)
    process = _popen(config)
    deadline = time.time() + 120
    while not (out / ".kdqat.lock").exists() and time.time() < deadline:
        assert process.poll() is None, process.stderr.read()[-3000:]
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 143, process.stderr.read()[-3000:]
    assert not (out / ".kdqat.lock").exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or ".kdqat-tmp" in p.name]
    run_train(config)
    assert json.loads((out / "results.json").read_text())["steps"]["kdqat"] == 6
