"""The SLURM per-node launcher, run as two "nodes" on localhost (one CPU rank each)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.tiny import REPO, make_task_dir, make_tiny_bert, train_env, write_config


def test_two_nodes_on_localhost_run_one_job(tmp_path):
    model = make_tiny_bert(tmp_path / "bert")
    data = make_task_dir(tmp_path / "task")
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.json", model, data, out)
    spec = json.loads(config.read_text())
    spec["kdqat"]["finetune"]["max_steps"] = 4
    spec["kdqat"]["train"]["max_steps"] = 4
    config.write_text(json.dumps(spec))

    env = train_env()
    env.update({"KDQAT_HOSTS": "127.0.0.1 localhost", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29650",
                "KDQAT_SLOTS_PER_NODE": "1", "KDQAT_PYTHON_BIN": str(Path(sys.executable).parent)})
    env.pop("SLURM_NODEID", None)
    nodes = []
    for node in (0, 1):
        node_env = {**env, "SLURM_NODEID": str(node)}
        nodes.append(subprocess.Popen(["bash", str(REPO / "run" / "slurm" / "launch_node.sh"), str(config)],
                                      env=node_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [p.communicate(timeout=600)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n----\n".join(o[-3000:] for o in outputs)
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2
    assert results["steps"]["kdqat"] == 4


def test_launcher_refuses_missing_node_id(tmp_path):
    env = {k: v for k, v in train_env().items() if k != "SLURM_NODEID"}
    result = subprocess.run(["bash", str(REPO / "run" / "slurm" / "launch_node.sh"), "x.json"], env=env,
                            capture_output=True, text=True)
    assert result.returncode != 0 and "SLURM_NODEID" in result.stderr
