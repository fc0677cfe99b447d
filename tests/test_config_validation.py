"""What the config check stops before any model loads: DeepSpeed keys the installed DeepSpeed does not read,
NaN/Infinity and out-of-range numbers, and a max_seq_length beyond the model's positions."""

import json

import pytest
import transformers

from ds_kdqat.config import SEED_MAX, check_finite_numbers, load_config, parse_config
from ds_kdqat.data.encode import check_max_seq_length, max_positions
from ds_kdqat.ds_schema import DeepSpeedSchema, check_deepspeed_keys, deepspeed_schema, model_keys
from ds_kdqat.errors import ConfigError
from tests.tiny import REPO, write_config

BASE = {"train_micro_batch_size_per_gpu": 4}


def error_of(data, overrides=None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data, overrides)
    return info.value


# --- DeepSpeed keys -------------------------------------------------------------------------------------


@pytest.mark.parametrize("data, path, message", [
    ({**BASE, "zero_optimisation": {"stage": 2}}, "zero_optimisation",
     "unknown DeepSpeed key; did you mean 'zero_optimization'?"),
    ({**BASE, "gradient_acumulation_steps": 2}, "gradient_acumulation_steps",
     "unknown DeepSpeed key; did you mean 'gradient_accumulation_steps'?"),
    ({**BASE, "zero_optimization": {"stage": 2, "overlap_com": True}}, "zero_optimization.overlap_com",
     "unknown DeepSpeed key; did you mean 'overlap_comm'?"),
    ({**BASE, "zero_optimization": {"stage": 3, "offload_param": {"devise": "cpu"}}},
     "zero_optimization.offload_param.devise", "unknown DeepSpeed key; did you mean 'device'?"),
    ({**BASE, "tensorboard": {"enabled": True, "jobname": "x"}}, "tensorboard.jobname",
     "unknown DeepSpeed key; did you mean 'job_name'?"),
    ({**BASE, "bf16": {"enable": True}}, "bf16.enable", "unknown DeepSpeed key; did you mean 'enabled'?"),
])
def test_deepspeed_key_typos_stop_the_run_with_a_suggestion(data, path, message):
    error = error_of(data)
    assert (error.path, error.message) == (path, message)


def test_a_key_nothing_resembles_says_deepspeed_does_not_read_it():
    error = error_of({**BASE, "qqqq": 1})
    assert error.path == "qqqq"
    assert error.message.startswith("unknown DeepSpeed key; DeepSpeed ")
    assert 'settings go under "kdqat"' in error.message


def test_a_removed_deepspeed_feature_is_reported_with_deepspeeds_reason():
    schema = deepspeed_schema()
    if "nebula" not in schema.removed:
        pytest.skip("this DeepSpeed does not list nebula as removed")
    error = error_of({**BASE, "nebula": {"enabled": True}})
    assert error.path == "nebula" and error.message.startswith(f"removed from DeepSpeed {schema.version}: ")
    assert "zero_optimization" in schema.removed_in_section


def test_an_override_typo_is_caught_too():
    error = error_of(dict(BASE), ["zero_optimization.stag=2"])
    assert (error.path, error.message) == ("zero_optimization.stag", "unknown DeepSpeed key; did you mean 'stage'?")


def test_kdqat_and_the_usual_deepspeed_keys_pass():
    run = parse_config({
        **BASE, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0, "steps_per_print": 10,
        "wall_clock_breakdown": False, "bf16": {"enabled": True}, "csv_monitor": {"enabled": True, "job_name": "a"},
        "wandb": {"enabled": False},
        "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                              "stage3_prefetch_bucket_size": 10, "prefetch_bucket_size": 10,
                              "offload_optimizer": {"device": "cpu", "pin_memory": True}},
        "kdqat": {"seed": 0},
    })
    assert run.zero_stage == 3


def test_deepspeeds_activation_checkpointing_section_is_refused_for_ours():
    error = error_of({**BASE, "activation_checkpointing": {"partition_activations": False}})
    assert error.path == "activation_checkpointing"
    assert "kdqat.train.activation_checkpointing: true" in error.message


def test_every_shipped_ds_config_and_the_test_config_pass(tmp_path):
    paths = sorted((REPO / "ds_configs").glob("*.json"))
    assert paths
    paths.append(write_config(tmp_path / "tiny.json", tmp_path / "model", tmp_path / "data", tmp_path / "out"))
    for path in paths:
        data = json.loads(path.read_text(encoding="utf-8"))
        check_deepspeed_keys(data)
        assert load_config(str(path)).deepspeed.keys() == data.keys() - {"kdqat"}, path


def test_the_key_set_comes_from_the_installed_deepspeed_and_is_cached():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    schema = deepspeed_schema()
    assert deepspeed_schema() is schema
    # read by DeepSpeed's config reader (traced), not only present as constants
    assert {"train_micro_batch_size_per_gpu", "zero_optimization", "gradient_clipping", "tensorboard",
            "csv_monitor", "hybrid_engine", "pipeline", "compile"} <= schema.traced
    assert schema.traced <= schema.top_level and "kdqat" not in schema.top_level
    assert not set(schema.removed) & schema.top_level
    assert schema.sections["zero_optimization"] is DeepSpeedZeroConfig
    zero = model_keys(DeepSpeedZeroConfig)
    assert {"stage", "offload_param", "stage3_max_live_parameters", "max_live_parameters"} <= zero


def test_the_check_takes_any_schema():
    schema = DeepSpeedSchema(version="x", top_level=frozenset({"alpha_beta"}))
    check_deepspeed_keys({"alpha_beta": 1, "kdqat": {"anything": 1}}, schema)
    with pytest.raises(ConfigError, match="did you mean 'alpha_beta'"):
        check_deepspeed_keys({"alpha_betta": 1}, schema)


# --- numbers --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, path, fragment", [
    ("kdqat.train.learning_rate=NaN", "kdqat.train.learning_rate", "got NaN; expected a finite number"),
    ("kdqat.train.epochs=Infinity", "kdqat.train.epochs", "got Infinity; expected a finite number"),
    ("kdqat.finetune.weight_decay=-Infinity", "kdqat.finetune.weight_decay", "got -Infinity; expected a finite"),
    ("kdqat.train.adam_betas=[NaN, 0.9]", "kdqat.train.adam_betas[0]", "got NaN; expected a finite number"),
    ("kdqat.train.epochs=1e400", "kdqat.train.epochs", "got Infinity"),
    ("kdqat.train.epochs=" + "9" * 400, "kdqat.train.epochs", "expected a finite number"),
    ("kdqat.train.epochs=0", "kdqat.train.epochs", "must be > 0 and finite"),
    ("kdqat.train.learning_rate=-1e-5", "kdqat.train.learning_rate", "must be > 0 and finite"),
    ("kdqat.train.adam_eps=0", "kdqat.train.adam_eps", "must be > 0 and finite"),
    ("kdqat.seed=-1", "kdqat.seed", f"expected an integer in [0, {SEED_MAX}]"),
    (f"kdqat.seed={2**32}", "kdqat.seed", "got 4294967296; expected an integer in [0, 4294967295]"),
    ("kdqat.seed=1.5", "kdqat.seed", "expected int"),
    ("kdqat.distill.budget=NaN", "kdqat.distill.budget", "got NaN; expected a finite number"),
    ("kdqat.distill.gamma=Infinity", "kdqat.distill.gamma", "expected a finite number"),
    ("kdqat.distill.temperature=NaN", "kdqat.distill.temperature", "expected a finite number"),
    ("kdqat.distill.ti.step_fraction=NaN", "kdqat.distill.ti.step_fraction", "expected a finite number"),
    ("kdqat.data.dev_fraction=NaN", "kdqat.data.dev_fraction", "expected a finite number"),
    ("kdqat.quant.lat.eps=Infinity", "kdqat.quant.lat.eps", "expected a finite number"),
    ("kdqat.quant.attention={\"clip\": Infinity}", "kdqat.quant.attention.clip", "expected a finite number"),
])
def test_kdqat_numbers_must_be_finite_and_in_range(override, path, fragment):
    error = error_of(dict(BASE), [override])
    assert error.path == path
    assert fragment in str(error)


def test_the_seed_range_edges_pass():
    assert parse_config(dict(BASE), ["kdqat.seed=0"]).kdqat.seed == 0
    assert parse_config(dict(BASE), [f"kdqat.seed={SEED_MAX}"]).kdqat.seed == SEED_MAX


def test_validate_catches_non_finite_values_set_directly():
    from ds_kdqat.config import ScheduleConfig
    from ds_kdqat.quant.config import AttentionActConfig, LatConfig

    with pytest.raises(ConfigError, match="kdqat.train.epochs: got Infinity; must be > 0 and finite"):
        ScheduleConfig(epochs=float("inf")).validate("kdqat.train")
    with pytest.raises(ConfigError, match="kdqat.train.learning_rate: got NaN"):
        ScheduleConfig(learning_rate=float("nan")).validate("kdqat.train")
    with pytest.raises(ConfigError, match=r"kdqat.quant.lat.eps: got inf, expected a finite number > 0"):
        LatConfig(eps=float("inf")).validate()
    with pytest.raises(ConfigError, match=r"clip: got inf, expected a finite number > 0"):
        AttentionActConfig(clip=float("inf")).validate()


@pytest.mark.parametrize("data, path, fragment", [
    ({**BASE, "gradient_clipping": float("nan")}, "gradient_clipping", "got NaN; expected a finite number"),
    ({**BASE, "gradient_clipping": -1.0}, "gradient_clipping", "expected a finite number >= 0"),
    ({**BASE, "gradient_clipping": True}, "gradient_clipping", "expected a finite number >= 0"),
    ({**BASE, "fp16": {"enabled": True, "loss_scale": float("inf")}}, "fp16.loss_scale", "got Infinity"),
    ({**BASE, "zero_optimization": {"stage": 1.0}}, "zero_optimization.stage", "allowed: 0, 1, 2, 3"),
    ({**BASE, "zero_optimization": {"stage": True}}, "zero_optimization.stage", "allowed: 0, 1, 2, 3"),
    ({**BASE, "zero_optimization": 2}, "zero_optimization", "expected an object"),
    ({"train_micro_batch_size_per_gpu": 4.0}, "train_micro_batch_size_per_gpu", "expected a positive integer"),
    ({**BASE, "gradient_accumulation_steps": float("nan")}, "gradient_accumulation_steps", "got NaN"),
])
def test_deepspeed_numbers_are_checked(data, path, fragment):
    error = error_of(data)
    assert error.path == path
    assert fragment in str(error)


def test_check_finite_numbers_names_list_positions():
    with pytest.raises(ConfigError) as info:
        check_finite_numbers({"a": {"b": [1.0, float("-inf")]}})
    assert info.value.path == "a.b[1]"


# --- max_seq_length against the model's positions -------------------------------------------------------


def test_max_seq_length_beyond_bert_positions_names_the_limit():
    config = transformers.BertConfig(max_position_embeddings=512)
    assert check_max_seq_length(config, 512) == 512
    with pytest.raises(ConfigError) as info:
        check_max_seq_length(config, 4096)
    assert info.value.path == "kdqat.data.max_seq_length"
    assert info.value.message.startswith("got 4096; the bert model takes at most 512 tokens")
    assert "max_position_embeddings 512" in info.value.message


def test_roberta_loses_the_padding_offset():
    config = transformers.RobertaConfig(max_position_embeddings=514, pad_token_id=1)
    assert check_max_seq_length(config, 512) == 512
    with pytest.raises(ConfigError, match=r"at most 512 tokens \(max_position_embeddings 514 - pad_token_id 1 - 1"):
        check_max_seq_length(config, 513, key="x.max_seq_length")
    xlmr = transformers.XLMRobertaConfig(max_position_embeddings=514, pad_token_id=1)
    assert max_positions(xlmr)[0] == 512


def test_relative_and_image_models_have_no_limit():
    assert check_max_seq_length(transformers.T5Config(), 100_000) is None
    assert check_max_seq_length(transformers.ViTConfig(), 4096) is None
    deberta = transformers.DebertaV2Config(position_biased_input=False)
    assert check_max_seq_length(deberta, 4096) is None
    assert check_max_seq_length(transformers.DebertaV2Config(max_position_embeddings=512), 512) == 512


def test_a_config_json_dict_works_too():
    with pytest.raises(ConfigError, match="at most 128 tokens"):
        check_max_seq_length({"model_type": "distilbert", "max_position_embeddings": 128}, 256)
