"""Stopping a launched run: run/launch.py on SIGTERM, a plain `deepspeed` runner that is SIGTERMed, a taken
rendezvous port; plus the wrapper's argument split, port choice and the rank's launcher watchdog.

The first three start real training runs on a tiny BERT (one CPU rank); KD-QAT is long enough (400 steps)
to be running when the signal arrives and checkpoints every 2 steps.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ds_kdqat.training import launch
from ds_kdqat.training.watchdog import LauncherWatchdog, is_gone, is_launcher
from tests.tiny import REPO, make_task_dir, make_tiny_bert, run_train, train_env, write_config

KD_STEPS = 400
WRAPPER = (sys.executable, str(REPO / "run" / "launch.py"), "--num_accelerators", "1")
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return make_tiny_bert(root / "bert"), make_task_dir(root / "task")


def _config(assets, folder: Path) -> Path:
    model, data = assets
    return write_config(folder / "c.json", model, data, folder / "out",
                        finetune={"epochs": 1, "learning_rate": 2e-3, "max_steps": 2},
                        train={"epochs": 100, "learning_rate": 5e-4, "max_steps": KD_STEPS},
                        logging={"log_every": 2, "save_every": 2, "progress": False})


def _latest_step(out: Path) -> int:
    latest = out / "checkpoints" / "kdqat" / "latest"
    return int(latest.read_text().strip().split("_")[1]) if latest.exists() else -1


def _wait_for_kd_checkpoint(out: Path, process: subprocess.Popen, log: Path, timeout: float = 300) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        step = _latest_step(out)
        if step >= 2:
            return step
        if process.poll() is not None:
            raise AssertionError(f"exited {process.returncode} before a KD-QAT checkpoint:\n{log.read_text()[-4000:]}")
        time.sleep(0.02)
    raise AssertionError("no KD-QAT checkpoint in time")


def _wait_gone(processes, timeout: float) -> list:
    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = [p for p in processes if not is_gone(p)]
        if not alive:
            return []
        time.sleep(0.1)
    return alive


def _ranks_below(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children(recursive=True)
            if "--local_rank=0" in p.cmdline() and not is_launcher(p.cmdline())]


def _start(command: list, log: Path) -> subprocess.Popen:
    with open(log, "w") as handle:
        return subprocess.Popen(command, env=train_env(), cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)


def test_sigterm_to_the_wrapper_checkpoints_exits_143_and_resumes(assets, tmp_path):
    config = _config(assets, tmp_path)
    out, log = tmp_path / "out", tmp_path / "first.log"
    command = [*WRAPPER, str(REPO / "run" / "train.py"), "--ds_config", str(config)]
    wrapper = _start(command, log)
    before = _wait_for_kd_checkpoint(out, wrapper, log)
    tree = psutil.Process(wrapper.pid).children(recursive=True)
    assert len(_ranks_below(wrapper.pid)) == 1, [p.cmdline() for p in tree]

    wrapper.send_signal(signal.SIGTERM)
    assert wrapper.wait(timeout=120) == 143, log.read_text()[-4000:]
    # the wrapper waited for the whole tree: nothing of it is left when it exits
    assert [p.pid for p in tree if not is_gone(p)] == []
    text = log.read_text()
    assert "exits with return code = 143" in text, text[-4000:]  # the rank checkpointed and exited 143
    after = _latest_step(out)
    assert before < after < KD_STEPS
    assert (out / "checkpoints" / "kdqat" / f"step_{after:08d}").is_dir()

    done = _kd_rows(out, after)
    run_train(config, launcher=WRAPPER)
    results = json.loads((out / "results.json").read_text())
    assert results["steps"]["kdqat"] == KD_STEPS
    # resumed, not restarted: the rows logged before the stop (timings included) are kept as they were
    assert done and _kd_rows(out, after) == done


def _kd_rows(out: Path, up_to: int) -> list[str]:
    lines = (out / "log.csv").read_text().splitlines()[1:]
    return [line for line in lines if ",kdqat:" in line and int(line.split(",")[0]) <= up_to]


def test_sigterm_to_a_plain_deepspeed_runner_stops_the_rank(assets, tmp_path):
    config = _config(assets, tmp_path)
    out, log = tmp_path / "out", tmp_path / "runner.log"
    runner = _start([DEEPSPEED, "--num_accelerators", "1", "--master_port", str(launch.free_port()),
                     str(REPO / "run" / "train.py"), "--ds_config", str(config)], log)
    before = _wait_for_kd_checkpoint(out, runner, log)
    ranks = _ranks_below(runner.pid)
    assert len(ranks) == 1
    below = psutil.Process(runner.pid).children(recursive=True)

    runner.send_signal(signal.SIGTERM)  # the runner has no handler: it ends at once
    runner.wait(timeout=30)
    assert _wait_gone(ranks, 60) == [], log.read_text()[-4000:]
    assert _wait_gone(below, 30) == []  # DeepSpeed's launch.py follows its rank
    text = log.read_text()
    assert "the launcher above this rank is gone" in text, text[-4000:]
    assert "exits with return code = 143" in text, text[-4000:]  # logged by launch.py
    assert before < _latest_step(out) < KD_STEPS


def test_a_taken_port_is_a_config_error_naming_it(assets, tmp_path):
    config = _config(assets, tmp_path)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result = run_train(config, launcher=(*WRAPPER, "--master_port", str(port)), check=False, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-4000:]
    assert f"ds-kdqat config error: MASTER_PORT: port {port} on 127.0.0.1 is in use" in output
    assert "Traceback" not in output


def test_the_wrapper_moves_off_a_taken_default_port(monkeypatch, capsys):
    held = socket.socket()
    try:
        held.bind(("127.0.0.1", launch.DEFAULT_PORT))
        held.listen()
    except OSError:
        pass  # already held by someone else: in use either way
    try:
        assert launch.port_in_use(launch.DEFAULT_PORT)
        commands = []

        class Recorder:
            def __init__(self, command, script):
                commands.append(command)

            def run(self):
                return 0

        monkeypatch.setattr(launch, "Supervisor", Recorder)
        assert launch.main(["--num_accelerators", "1", "run/train.py", "--ds_config", "c.json"]) == 0
        command = commands[-1]
        port = int(command[command.index("--master_port") + 1])
        assert port != launch.DEFAULT_PORT and not launch.port_in_use(port)
        assert command[-3:] == ["run/train.py", "--ds_config", "c.json"]
        assert f"using --master_port {port}" in capsys.readouterr().out
        # a port given explicitly is left alone, even the taken default
        launch.main(["--master_port", str(launch.DEFAULT_PORT), "run/train.py"])
        assert "--master_port" not in commands[-1][-2:] and commands[-1].count("--master_port") == 1
    finally:
        held.close()


def test_split_args_and_launcher_detection():
    args = launch.split_args(["-H", "hosts", "--no_ssh", "--master_p=5", "--num_accelerators", "2",
                              "run/train.py", "--ds_config", "c.json", "--no_ssh"])
    assert args.script == "run/train.py" and args.script_args == ["--ds_config", "c.json", "--no_ssh"]
    assert args.options == {"--hostfile": "hosts", "--no_ssh": True, "--master_port": "5",
                            "--num_accelerators": "2"}
    with pytest.raises(ValueError, match="no training script"):
        launch.split_args(["--num_accelerators", "1"])
    assert is_launcher(["/v/bin/python", "/v/bin/deepspeed", "--num_accelerators", "1", "run/train.py"])
    assert is_launcher(["python", "-u", "-m", "deepspeed.launcher.launch", "--world_info=x"])
    assert is_launcher(["/v/bin/torchrun", "--standalone", "run/train.py"])
    assert is_launcher(["python", "/repo/run/launch.py", "run/train.py"])
    assert not is_launcher(["python", "-u", "run/train.py", "--local_rank=0"])
    assert not is_launcher(["python", "-m", "pytest", "deepspeed"])
    assert is_launcher(["/v/bin/python", "/v/bin/ds-kdqat", "launch", "--num_accelerators", "2", "run/train.py"])
    assert is_launcher(["python", "-m", "ds_kdqat", "launch", "run/train.py"])
    assert not is_launcher(["/v/bin/python", "/v/bin/ds-kdqat", "train", "--ds_config", "c.json"])
    assert not is_launcher(["python", "-m", "ds_kdqat", "train", "--ds_config", "launch"])


def test_watchdog_fires_once_when_a_launcher_is_gone_and_is_idle_without_one():
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    fired = []
    watchdog = LauncherWatchdog([psutil.Process(stand_in.pid)], poll_seconds=0.05).start()
    watchdog.subscribe(lambda: fired.append(1))
    time.sleep(0.3)
    assert fired == []
    stand_in.kill()  # left unreaped for a moment: a zombie counts as gone
    deadline = time.time() + 10
    while not fired and time.time() < deadline:
        time.sleep(0.05)
    stand_in.wait()
    assert fired == [1]
    watchdog.subscribe(lambda: fired.append(2))  # late subscribers hear at once
    assert fired == [1, 2]
    # a plain `python` process (here under pytest) has no launcher chain, so no thread
    probe = subprocess.run([sys.executable, "-c", "from ds_kdqat.training.watchdog import watch_launchers as w; "
                            "d = w(); print(len(d.chain), d._thread is None)"],
                           cwd=REPO, capture_output=True, text=True, check=True)
    assert probe.stdout.split() == ["0", "True"]
