"""Sweeps with a fake trainer: grid, commands, resume after SIGKILL, failures, SLURM script, table."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ds_kdqat.errors import ConfigError
from ds_kdqat.sweep import aggregate_sweep, grid_points, load_sweep_config, point_command, point_dir, run_sweep
from ds_kdqat.sweep.grid import format_value
from ds_kdqat.sweep.runner import SWEEP_STATUS_FILE, point_lock, run_point

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "run" / "sweep.py"

# Writes results.json from the --set values: student accuracy = recipe base + task offset + 0.01·seed,
# teacher = 0.9 + task offset. FAKE_SLEEP delays it, FAKE_FAIL_TASK makes that task exit 3, FAKE_LOG
# receives "start NAME" / "done NAME" lines.
FAKE_TRAINER = textwrap.dedent(
    """
    import argparse, json, os, sys, time
    parser = argparse.ArgumentParser()
    parser.add_argument("--ds_config", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--extra", default="")
    args = parser.parse_args()
    assert os.path.isfile(args.ds_config), args.ds_config
    def parse(text):
        try:
            return json.loads(text)
        except ValueError:
            return text
    values = {k: parse(v) for k, v in (s.split("=", 1) for s in args.set)}
    name = os.path.basename(args.output_dir)
    def note(event):
        with open(os.environ["FAKE_LOG"], "a") as log:
            log.write(f"{event} {name} {json.dumps(values, sort_keys=True)} {args.extra}\\n")
    note("start")
    os.makedirs(args.output_dir, exist_ok=True)
    time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
    task = values["kdqat.data.task"]
    if task == os.environ.get("FAKE_FAIL_TASK"):
        sys.exit(3)
    offset = {"a": 0.0, "b": 0.05}[task]
    student = {"map": 0.80, "output": 0.70}[values["kdqat.distill.recipe"]] + offset + 0.01 * values["kdqat.seed"]
    result = {"task": task, "primary_metric": "accuracy", "teacher": {"accuracy": 0.9 + offset},
              "student": {"accuracy": student}, "wall_time_s": 1.0}
    tmp = os.path.join(args.output_dir, "results.json.tmp")
    with open(tmp, "w") as handle:
        json.dump(result, handle)
    os.replace(tmp, os.path.join(args.output_dir, "results.json"))
    note("done")
    """
)


@pytest.fixture
def sweep_file(tmp_path):
    trainer = tmp_path / "fake_train.py"
    trainer.write_text(FAKE_TRAINER)
    base = tmp_path / "base.json"
    base.write_text("{}")
    data = {
        "ds_config": str(base),
        "output_root": str(tmp_path / "out"),
        "trainer": str(trainer),
        "launcher": sys.executable,
        "axes": {"recipes": ["map", "output"], "tasks": ["a", "b"], "seeds": [1, 2], "budgets": ["O"]},
    }
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(data))
    return path


def fake_env(tmp_path, **extra):
    env = dict(os.environ, FAKE_LOG=str(tmp_path / "trainer.log"), FAKE_SLEEP="0")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def log_events(tmp_path):
    path = tmp_path / "trainer.log"
    if not path.exists():
        return []
    return [line.split(" ", 2)[:2] for line in path.read_text().splitlines()]


def run_cli(args, env, timeout=120):
    return subprocess.run([sys.executable, str(SWEEP), *args], env=env, capture_output=True, text=True, timeout=timeout)


EXPECTED_TABLE_ROWS = [
    "| Full precision (teacher) |  | 90.00 ± 0.00 | 95.00 ± 0.00 | 92.50 |",
    "| map | O | 81.50 ± 0.71 | 86.50 ± 0.71 | 84.00 |",
    "| output | O | 71.50 ± 0.71 | 76.50 ± 0.71 | 74.00 |",
]


def test_grid_order_names_and_commands(sweep_file):
    config = load_sweep_config(sweep_file, ["axes.overrides={\"kdqat.distill.gamma\": [0.2, 0.5]}",
                                            "axes.budgets=[\"O\", \"O4\"]", "trainer_args=[\"--extra\", \"x\"]"])
    points = grid_points(config)
    assert len(points) == 2 * 2 * 2 * 2 * 2
    first, second = points[0], points[1]
    assert (first.recipe, first.budget, first.hparams, first.task, first.seed) == ("map", "O", (("kdqat.distill.gamma", 0.2),), "a", 1)
    assert (second.task, second.seed) == ("a", 2)  # seeds vary fastest
    assert points[4].hparams == (("kdqat.distill.gamma", 0.5),)
    assert points[8].budget == "O4" and points[16].recipe == "output"
    names = [p.name for p in points]
    assert len(set(names)) == len(names)
    assert first.name.startswith("map_a_O_s1_gamma-0.2-")
    assert grid_points(config)[0].name == first.name  # stable
    command = point_command(config, first)
    assert command[:2] == [sys.executable, config.trainer]
    assert command[2:6] == ["--ds_config", config.ds_config, "--output_dir", str(point_dir(config, first))]
    sets = [command[i + 1] for i, word in enumerate(command) if word == "--set"]
    assert sets == ["kdqat.distill.recipe=map", "kdqat.data.task=a", "kdqat.seed=1", "kdqat.distill.budget=O",
                    "kdqat.distill.gamma=0.2"]
    assert command[-2:] == ["--extra", "x"]


def test_format_value_round_trips_through_json_overrides():
    assert format_value("map") == "map"
    assert format_value("1") == '"1"' and format_value("true") == '"true"'
    assert format_value(True) == "true" and format_value(2) == "2" and format_value(0.5) == "0.5"


def test_null_axis_value_sets_the_key_to_null(sweep_file):
    """``train_file: [null, aug.tsv]`` = without and with: null reaches the trainer as JSON null."""
    config = load_sweep_config(sweep_file, ["axes.overrides={\"kdqat.data.train_file\": [null, \"aug.tsv\"]}"])
    points = grid_points(config)
    assert {p.hparams for p in points} == {(("kdqat.data.train_file", None),), (("kdqat.data.train_file", "aug.tsv"),)}
    assert points[0].hparams == (("kdqat.data.train_file", None),)
    sets = [w for w in point_command(config, points[0]) if w.startswith("kdqat.data.train_file=")]
    assert sets == ["kdqat.data.train_file=null"] and "train-file-null" in points[0].name
    assert format_value(None) == "null"


def test_launcher_prefix(sweep_file):
    config = load_sweep_config(sweep_file, ["launcher=deepspeed --num_accelerators 2 --master_port 29511"])
    command = point_command(config, grid_points(config)[0])
    assert command[:6] == ["deepspeed", "--num_accelerators", "2", "--master_port", "29511", config.trainer]


@pytest.mark.parametrize(
    "override, path, words",
    [
        ("axes.tasks=[]", "axes.tasks", "at least one"),
        ("axes.seeds=[1, 1]", "axes.seeds[1]", "twice"),
        ("axes.budgets=[\"O8\"]", "axes.budgets[0]", "expected \"O\" | \"O2\" | \"O4\" | float"),
        ("axes.budgets=[-1]", "axes.budgets[0]", "> 0"),
        ("axes.colour=1", "axes.colour", "unknown key"),
        ("axes.overrides={\"kdqat.seed\": [1]}", "axes.overrides.kdqat.seed", "already set"),
        ("axes.overrides={\"bad key\": [1]}", "axes.overrides.bad key", "dotted"),
        ("aggregate.model=\"ema\"", "aggregate.model", "allowed"),
        ("slurm.max_parallel=0", "slurm.max_parallel", ">= 1"),
        ("timeout_s=0", "timeout_s", "> 0"),
        ("ds_config=\"missing.json\"", "ds_config", "file not found"),
    ],
)
def test_config_errors_name_the_key(sweep_file, override, path, words):
    with pytest.raises(ConfigError) as info:
        load_sweep_config(sweep_file, [override])
    assert info.value.path == path and words in str(info.value)


def test_yaml_sweep_file(sweep_file, tmp_path):
    import yaml

    data = json.loads(sweep_file.read_text())
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    assert len(grid_points(load_sweep_config(path))) == 8
    path.write_text("axes: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_sweep_config(path)
    assert info.value.path == f"{path}:2"
    path = tmp_path / "broken.json"
    path.write_text('{"axes":\n  {"tasks": [1,]}}')
    with pytest.raises(ConfigError, match="not valid JSON") as info:
        load_sweep_config(path)
    assert info.value.path == f"{path}:2"


def test_resume_after_sigkill_runs_each_point_once(sweep_file, tmp_path):
    env = fake_env(tmp_path, FAKE_SLEEP=0.4)
    process = subprocess.Popen([sys.executable, str(SWEEP), "--config", str(sweep_file)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while sum(event == "done" for event, _ in log_events(tmp_path)) < 3:
        assert process.poll() is None and time.monotonic() < deadline, "the sweep ended before it was killed"
        time.sleep(0.05)
    time.sleep(0.15)  # let the fourth point start, so one run is cut short
    os.killpg(process.pid, signal.SIGKILL)  # the whole job dies, as when a node or SLURM job is killed
    process.wait()
    first = log_events(tmp_path)
    done_before = {name for event, name in first if event == "done"}
    assert 3 <= len(done_before) < 8

    status = json.loads((tmp_path / "out" / SWEEP_STATUS_FILE).read_text())
    assert status["counts"]["done"] == len(done_before)

    result = run_cli(["--config", str(sweep_file)], fake_env(tmp_path))
    assert result.returncode == 0, result.stderr
    events = log_events(tmp_path)
    names = {p.name for p in grid_points(load_sweep_config(sweep_file))}
    for name in names:
        assert [e for e, n in events if n == name].count("done") == 1, name
    for name in done_before:  # finished points are never started again
        assert [e for e, n in events if n == name].count("start") == 1, name
    status = json.loads((tmp_path / "out" / SWEEP_STATUS_FILE).read_text())
    assert status["counts"] == {"done": 8}
    table = (tmp_path / "out" / "results_table.md").read_text()
    for row in EXPECTED_TABLE_ROWS:
        assert row in table
    # a third run has nothing to do
    assert run_cli(["--config", str(sweep_file)], fake_env(tmp_path)).returncode == 0
    assert len(log_events(tmp_path)) == len(events)


def test_failed_points_are_recorded_and_rerun(sweep_file, tmp_path):
    result = run_cli(["--config", str(sweep_file)], fake_env(tmp_path, FAKE_FAIL_TASK="b"))
    assert result.returncode == 1
    assert "4 point(s) failed" in result.stderr
    status = json.loads((tmp_path / "out" / SWEEP_STATUS_FILE).read_text())
    assert status["counts"] == {"done": 4, "failed": 4}
    failed = [p for p in status["points"] if p["status"] == "failed"]
    assert {p["task"] for p in failed} == {"b"} and all(p["returncode"] == 3 for p in failed)
    table = (tmp_path / "out" / "results_table.md").read_text()
    assert "| map | O | 81.50 ± 0.71 | – | 81.50 (1/2 tasks) |" in table

    result = run_cli(["--config", str(sweep_file)], fake_env(tmp_path))
    assert result.returncode == 0, result.stderr
    record = json.loads((point_dir(load_sweep_config(sweep_file), grid_points(load_sweep_config(sweep_file))[2])
                         / "sweep_point.json").read_text())
    assert record["status"] == "done" and record["attempts"] == 2


def test_partial_seeds_show_n(sweep_file, tmp_path):
    result = run_cli(["--config", str(sweep_file), "--run-index", "0", "--run-index", "2", "--run-index", "3"],
                     fake_env(tmp_path))
    assert result.returncode == 0, result.stderr
    table = (tmp_path / "out" / "results_table.md").read_text()
    assert "| map | O | 81.00 (n=1) | 86.50 ± 0.71 | 83.75 |" in table
    assert "| output | O | – | – | – |" in table
    csv_lines = (tmp_path / "out" / "results_table.csv").read_text().splitlines()
    assert csv_lines[0] == "recipe,budget,a_mean,a_std,a_n,b_mean,b_std,b_n,avg_mean,avg_tasks"
    assert csv_lines[2].startswith("map,O,81.0,,1,86.5,0.7071,2,83.75,2")
    points_csv = (tmp_path / "out" / "results_points.csv").read_text().splitlines()
    assert len(points_csv) == 9 and points_csv[1].split(",")[6:8] == ["True", "accuracy"]


def test_busy_point_is_left_alone(sweep_file, tmp_path):
    os.environ["FAKE_LOG"] = str(tmp_path / "trainer.log")
    try:
        config = load_sweep_config(sweep_file)
        point = grid_points(config)[0]
        with point_lock(point_dir(config, point)) as fd:
            assert fd is not None
            outcome = run_point(config, point, echo=lambda _: None)
        assert outcome.outcome == "busy" and log_events(tmp_path) == []
        assert run_point(config, point, echo=lambda _: None).outcome == "done"
        assert run_point(config, point, echo=lambda _: None).outcome == "skipped"
    finally:
        del os.environ["FAKE_LOG"]


def test_timeout_fails_the_point(sweep_file, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "trainer.log"))
    monkeypatch.setenv("FAKE_SLEEP", "30")
    config = load_sweep_config(sweep_file, ["timeout_s=1"])
    start = time.monotonic()
    report = run_sweep(config, [0], echo=lambda _: None)
    assert time.monotonic() - start < 20
    assert report.failed and "timeout_s=1" in report.failed[0].message
    assert report.status["points"][0]["status"] == "failed"


def test_slurm_script_runs_nothing_and_array_task_runs_one_point(sweep_file, tmp_path):
    result = run_cli(["--config", str(sweep_file), "--slurm", "--set", "slurm.partition=\"gpu\"",
                      "--set", "slurm.max_parallel=4", "--set", "slurm.setup=[\"module load cuda\"]"], fake_env(tmp_path))
    assert result.returncode == 0, result.stderr
    script = (tmp_path / "out" / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-7%4" in script
    assert "#SBATCH --partition=gpu" in script
    assert "module load cuda" in script
    assert '--run-index "${SLURM_ARRAY_TASK_ID}"' in script
    snapshot = tmp_path / "out" / "sweep_config.json"
    assert f"--config {snapshot}" in script
    assert log_events(tmp_path) == []  # nothing ran
    # what array task 5 does
    result = run_cli(["--config", str(snapshot), "--run-index", "5"], fake_env(tmp_path))
    assert result.returncode == 0, result.stderr
    config = load_sweep_config(snapshot)
    assert [n for e, n in log_events(tmp_path) if e == "done"] == [grid_points(config)[5].name]
    assert run_cli(["--config", str(snapshot), "--run-index", "8"], fake_env(tmp_path)).returncode == 2


def test_bad_sweep_file_exits_2(sweep_file, tmp_path):
    result = run_cli(["--config", str(sweep_file), "--set", "axes.tasks=[]"], fake_env(tmp_path))
    assert result.returncode == 2 and "axes.tasks" in result.stderr


def test_aggregate_reports_bad_results(sweep_file, tmp_path):
    config = load_sweep_config(sweep_file)
    directory = point_dir(config, grid_points(config)[0])
    directory.mkdir(parents=True)
    (directory / "results.json").write_text(json.dumps({"primary_metric": "f1", "student": {"accuracy": 1}}))
    from ds_kdqat.errors import DataError

    with pytest.raises(DataError, match="has no student.f1"):
        aggregate_sweep(config)
