"""The ds_config loader: defaults, overrides, and errors that name the key path (exit status 2)."""

import json
import subprocess
import sys

import pytest

from ds_kdqat.config import KdqatConfig, load_config, parse_config
from ds_kdqat.configtools import apply_overrides, from_dict, to_dict
from ds_kdqat.errors import ConfigError
from tests.tiny import REPO, train_env

BASE = {"train_micro_batch_size_per_gpu": 4}


def error_of(data, overrides=None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data, overrides)
    return info.value


def test_defaults_are_the_ternarybert_recipe_on_the_embedded_task():
    run = parse_config(dict(BASE))
    assert run.kdqat.data.task == "rt_polarity"
    assert run.kdqat.distill.recipe == "ternarybert"
    assert run.kdqat.quant.preset == "ternarybert"
    assert run.kdqat.train.optimizer == "bertadam"
    assert (run.micro_batch_size, run.gradient_accumulation_steps, run.zero_stage) == (4, 1, 0)


def test_every_shipped_config_loads():
    for path in sorted((REPO / "ds_configs").glob("*.json")):
        run = load_config(str(path))
        assert run.kdqat.output_dir, path


@pytest.mark.parametrize("kdqat, path, fragment", [
    ({"trian": {}}, "kdqat.trian", "unknown key; allowed keys: data, distill"),
    ({"train": {"epochs": -1}}, "kdqat.train.epochs", "must be > 0"),
    ({"train": {"optimizer": "sgd"}}, "kdqat.train.optimizer", 'allowed: "bertadam", "adamw", "adafactor"'),
    ({"train": {"learning_rate": "fast"}}, "kdqat.train.learning_rate", "expected float"),
    ({"distill": {"recipe": "mapp"}}, "kdqat.distill.recipe", "allowed"),
    ({"distill": {"budget": "O3"}}, "kdqat.distill.budget", "allowed"),
    ({"data": {"task": "glue"}}, "kdqat.data.task", "rt_polarity"),
    ({"quant": {"preset": "ternary"}}, "kdqat.quant.preset", "ternarybert_reference"),
    ({"logging": {"save_every": 0}}, "kdqat.logging.save_every", "positive"),
    ({"train": {"learning_rate": float("nan")}}, "kdqat.train.learning_rate", "expected a finite number"),
    ({"seed": -1}, "kdqat.seed", "expected an integer in [0, 4294967295]"),
    ({"model": {"teacher_finetune": "yes"}}, "kdqat.model.teacher_finetune", '"auto", "always", "never"'),
])
def test_bad_values_name_their_key_path(kdqat, path, fragment):
    error = error_of({**BASE, "kdqat": kdqat})
    assert error.path == path
    assert fragment in str(error)


@pytest.mark.parametrize("data, path", [
    ({}, "train_micro_batch_size_per_gpu"),
    ({**BASE, "train_batch_size": 8}, "train_batch_size"),
    ({**BASE, "zero_optimization": {"stage": 4}}, "zero_optimization.stage"),
    ({**BASE, "compression_training": {}}, "compression_training"),
    ({**BASE, "zero_optimisation": {"stage": 2}}, "zero_optimisation"),
    ({**BASE, "zero_optimization": {"stage": 2, "overlap_com": True}}, "zero_optimization.overlap_com"),
    ({**BASE, "gradient_clipping": -1}, "gradient_clipping"),
    ({**BASE, "optimizer": {"type": "AdamW"}}, "optimizer"),
    ({**BASE, "fp16": {"enabled": True}, "bf16": {"enabled": True}}, "fp16.enabled"),
    ({**BASE, "zero_optimization": {"stage": 2}, "kdqat": {"train": {"optimizer": "adafactor"}}},
     "kdqat.train.optimizer"),
])
def test_bad_deepspeed_keys(data, path):
    assert error_of(data).path == path


def test_overrides_are_parsed_as_json_and_create_objects():
    data = apply_overrides(dict(BASE), ["kdqat.distill.gamma=0.25", "kdqat.distill.recipe=map_output",
                                        "kdqat.data.max_train_examples=null", 'kdqat.output_dir="x y"'])
    assert data["kdqat"] == {"distill": {"gamma": 0.25, "recipe": "map_output"},
                             "data": {"max_train_examples": None}, "output_dir": "x y"}
    run = parse_config(dict(BASE), ["kdqat.distill.recipe=map"])
    assert run.kdqat.distill.recipe == "map"
    assert error_of(dict(BASE), ["kdqat.train=3"]).path == "kdqat.train"


def test_round_trip_through_dict():
    config = from_dict(KdqatConfig, {"train": {"epochs": 2}, "distill": {"recipe": "map"}}, "kdqat")
    again = from_dict(KdqatConfig, json.loads(json.dumps(to_dict(config))), "kdqat")
    assert again == config


def test_monitor_output_follows_output_dir():
    run = parse_config({**BASE, "tensorboard": {"enabled": True}, "kdqat": {"output_dir": "runs/a"}})
    assert run.deepspeed["tensorboard"]["output_path"] == "runs/a/monitor"


def test_json_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "train_micro_batch_size_per_gpu": 4,\n  "kdqat": {,}\n}\n')
    with pytest.raises(ConfigError, match=r"bad\.json:3:\d+: invalid JSON"):
        load_config(str(path))


def test_train_entry_point_exits_2_on_a_bad_config(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**BASE, "kdqat": {"distill": {"recipe": "nope"}}}))
    result = subprocess.run([sys.executable, str(REPO / "run" / "train.py"), "--ds_config", str(path)],
                            env=train_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "kdqat.distill.recipe" in result.stderr and "ternarybert" in result.stderr
    assert not (tmp_path / "outputs").exists()
