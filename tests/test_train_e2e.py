"""run/train.py end to end on a tiny real BERT: outputs, resume after kills, multi-rank ZeRO, bad input.

These launch real processes (DeepSpeed engine, CPU/gloo). The tiny task is learnable, so the metrics are
meaningful; what is asserted is exact where the run is deterministic (resume) and within a stated tolerance
where the arithmetic is split differently (ranks, ZeRO).
"""

from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.tiny import REPO, make_task_dir, make_tiny_bert, run_train, train_env, write_config


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return make_tiny_bert(root / "bert"), make_task_dir(root / "task")


def read_log(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def train_losses(out: Path, stage: str = "kdqat") -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r["total"])) for r in read_log(out / "log.csv")
            if r["phase"].startswith(stage) and r["split"] == "train"]


@pytest.fixture(scope="module")
def reference_run(assets, tmp_path_factory):
    """One complete single-rank run; other tests compare with it."""
    model, data = assets
    root = tmp_path_factory.mktemp("reference")
    config = write_config(root / "c.json", model, data, root / "out")
    result = run_train(config)
    return root / "out", result, config


def test_outputs_of_a_complete_run(reference_run):
    out, result, _ = reference_run
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "sst2" and results["primary_metric"] == "accuracy"
    # the tiny task is separable by word identity: the fine-tuned teacher must have learnt it
    assert results["teacher"]["accuracy"] >= 0.9
    assert results["student"]["accuracy"] >= 0.75
    assert results["size"]["ratio"] > 1.0
    # every stage's terms are logged; the ternarybert recipe has its three terms
    rows = read_log(out / "log.csv")
    kd_train = [r for r in rows if r["phase"] == "kdqat:kd" and r["split"] == "train"]
    assert kd_train and all(r["pred"] and r["layer_output"] and r["attention_score"] for r in kd_train)
    assert any(r["phase"] == "finetune:supervised" and r["split"] == "dev" for r in rows)
    # the KD loss goes down
    losses = [float(r["total"]) for r in kd_train]
    assert losses[-1] < losses[0]
    for name in ("teacher/done.json", "teacher/config.json", "student/config.json", "student/kdqat_quant.json",
                 "student_packed", "config.json"):
        assert (out / name).exists(), name
    assert "compression" in result.stdout and "student accuracy" in result.stdout
    # the exported student runs on the int8 backend: same classes as the fake-quant student, same accuracy
    int8 = results["student_int8"]
    assert int8["agreement_with_fakequant"] >= 0.995
    assert abs(int8["accuracy"] - results["student"]["accuracy"]) <= 0.005
    assert "student int8 backend accuracy" in result.stdout
    # DeepSpeed's monitor got every term too (csv_monitor here; tensorboard takes the same events)
    monitor_files = {p.name for p in (out / "monitor").rglob("*.csv")}
    assert {"kdqat_kd_train_total.csv", "kdqat_kd_dev_accuracy.csv"} <= monitor_files, monitor_files


def test_rerun_of_a_finished_run_trains_nothing(reference_run):
    out, _, config = reference_run
    before = (out / "log.csv").read_text()
    run_train(config)
    assert (out / "log.csv").read_text() == before


def _wait_for_checkpoint(out: Path, stage: str, min_step: int, process: subprocess.Popen, timeout: float = 300):
    latest = out / "checkpoints" / stage / "latest"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if latest.exists() and int(latest.read_text().strip().split("_")[1]) >= min_step:
            return
        if process.poll() is not None:
            raise AssertionError(f"training ended (rc {process.returncode}) before step {min_step} was saved")
        time.sleep(0.02)
    raise AssertionError("no checkpoint in time")


def _start(config: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "run" / "train.py"), "--ds_config", str(config)],
                            env=train_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_resume_after_sigkill_and_sigterm_matches_an_uninterrupted_run(assets, reference_run, tmp_path):
    model, data = assets
    reference_out = reference_run[0]
    config = write_config(tmp_path / "c.json", model, data, tmp_path / "out")
    out = tmp_path / "out"

    first = _start(config)  # killed without warning during teacher fine-tuning
    _wait_for_checkpoint(out, "finetune", 4, first)
    first.kill()
    first.wait()

    second = _start(config)  # asked to stop during KD-QAT: checkpoints and exits 143
    _wait_for_checkpoint(out, "kdqat", 4, second)
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=120) == 143, second.stderr.read()[-3000:]

    third = _start(config)  # killed again mid KD-QAT
    _wait_for_checkpoint(out, "kdqat", 12, third)
    third.kill()
    third.wait()

    run_train(config)
    ours = json.loads((out / "results.json").read_text())
    theirs = json.loads((reference_out / "results.json").read_text())
    assert ours["student"] == theirs["student"]
    assert ours["teacher"] == theirs["teacher"]
    assert train_losses(out) == train_losses(reference_out)
    assert train_losses(out, "finetune") == train_losses(reference_out, "finetune")


def test_bad_data_file_names_file_and_line(assets, tmp_path):
    model, data = assets
    bad = tmp_path / "task"
    make_task_dir(bad)
    lines = (bad / "train.tsv").read_text().splitlines()
    lines[5] = lines[5].split("\t")[0] + "\tmaybe"
    (bad / "train.tsv").write_text("\n".join(lines) + "\n")
    config = write_config(tmp_path / "c.json", model, bad, tmp_path / "out")
    result = run_train(config, check=False)
    assert result.returncode == 2
    assert f"{bad / 'train.tsv'}:6" in result.stderr
    assert "maybe" in result.stderr


def _without_dropout(teacher_dir: Path, tmp: Path) -> Path:
    """A copy of the teacher with dropout off: with dropout, 1 rank × 16 and 2 ranks × 8 draw different masks."""
    copy = tmp / "teacher_no_dropout"
    shutil.copytree(teacher_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def _kd_losses_with(launcher: tuple, assets, teacher_dir: Path, tmp: Path, stage: int, micro: int) -> list:
    model, data = assets
    teacher_dir = _without_dropout(teacher_dir, tmp)
    config = write_config(tmp / "c.json", model, data, tmp / "out",
                          model={"teacher": str(teacher_dir), "teacher_finetune": "never", "local_files_only": True})
    spec = json.loads(config.read_text())
    spec["zero_optimization"] = {"stage": stage}
    spec["train_micro_batch_size_per_gpu"] = micro
    spec["kdqat"]["logging"]["log_every"] = 1
    spec["kdqat"]["train"]["max_steps"] = 6
    config.write_text(json.dumps(spec))
    run_train(config, launcher=launcher)
    results = json.loads((tmp / "out" / "results.json").read_text())
    assert results["zero_stage"] == stage
    # under ZeRO-3 the frozen teacher is sharded like the student (kdqat.model.partition_teacher)
    assert results["teacher_partitioned"] == (stage == 3)
    return train_losses(tmp / "out")


# Two ranks with micro batch 8 see exactly the examples one rank with micro batch 16 sees (training.order);
# the losses differ only by how the mean over the batch is split (each rank averages its own half, and
# token-averaged terms weight the halves by their token counts) and float summation order.
RANK_TOLERANCE = 2e-3


DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


@pytest.fixture(scope="module")
def one_rank_losses(assets, reference_run, tmp_path_factory):
    return _kd_losses_with((sys.executable,), assets, reference_run[0] / "teacher",
                           tmp_path_factory.mktemp("one_rank"), 0, 16)


def _assert_close(one: list, two: list) -> None:
    assert [s for s, _ in one] == [s for s, _ in two] == list(range(1, 7))
    for (_, a), (_, b) in zip(one, two):
        assert abs(a - b) <= RANK_TOLERANCE * max(1.0, abs(a)), (one, two)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_two_ranks_zero_stages_match_one_rank(stage, assets, reference_run, one_rank_losses, tmp_path):
    launcher = (DEEPSPEED, "--num_accelerators", "2", "--master_port", str(29600 + stage))
    two = _kd_losses_with(launcher, assets, reference_run[0] / "teacher", tmp_path, stage, 8)
    _assert_close(one_rank_losses, two)


def test_torchrun_launch(assets, reference_run, one_rank_losses, tmp_path):
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    two = _kd_losses_with(launcher, assets, reference_run[0] / "teacher", tmp_path, 2, 8)
    _assert_close(one_rank_losses, two)
