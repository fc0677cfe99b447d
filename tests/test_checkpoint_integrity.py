"""Training checkpoints: manifest of every file, verified load with fallback, RNG state without pickle.

A real DeepSpeed engine (ZeRO-1, CPU, one rank, in this process) on a tiny torch model."""

import json
import os
import random
import warnings

import numpy as np
import pytest
import torch

from ds_kdqat.errors import DataError
from ds_kdqat.training import checkpoint

MODEL_STATES = "mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def deepspeed_module():
    """DeepSpeed with a one-rank gloo group for this module; the group and environment are undone after."""
    from tests.tiny import one_rank_group

    with one_rank_group():
        import deepspeed

        yield deepspeed


@pytest.fixture
def make_engine(deepspeed_module):
    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
        engine, *_ = deepspeed_module.initialize(
            model=model, optimizer=torch.optim.AdamW(model.parameters(), 1e-2),
            config={"train_micro_batch_size_per_gpu": 2, "zero_allow_untested_optimizer": True,
                    "zero_optimization": {"stage": 1}, "steps_per_print": 10 ** 6})
        return engine
    return make


def _train(engine, steps):
    for _ in range(steps):
        loss = engine(torch.randn(2, 8)).pow(2).sum()
        engine.backward(loss)
        engine.step()


def _params(engine):
    return {name: p.detach().clone() for name, p in engine.module.named_parameters()}


def _save_two(engine, folder, keep=3):
    """Checkpoints at steps 2 and 4 (real optimizer steps between); the parameters at each."""
    _train(engine, 2)
    at2 = _params(engine)
    checkpoint.save(engine, str(folder), 2, {"micro": 2}, 0, keep)
    _train(engine, 2)
    at4 = _params(engine)
    checkpoint.save(engine, str(folder), 4, {"micro": 4}, 0, keep)
    _train(engine, 1)  # the engine moves on, so a load has something to undo
    assert any(not torch.equal(at2[k], at4[k]) for k in at2)
    return at2, at4


def _load_with_warning(engine, folder):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state, tensors = checkpoint.load(engine, str(folder), 0)
    messages = [str(w.message) for w in caught if issubclass(w.category, checkpoint.CheckpointWarning)]
    return state, messages


def _assert_params(engine, expected):
    actual = _params(engine)
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


def test_corrupt_model_states_falls_back_to_previous(tmp_path, make_engine):
    engine = make_engine()
    at2, _ = _save_two(engine, tmp_path)
    target = tmp_path / "step_00000004" / MODEL_STATES
    data = bytearray(target.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 256] = b"\x00" * 256 if data[middle] else b"\x01" * 256
    target.write_bytes(bytes(data))
    state, messages = _load_with_warning(engine, tmp_path)
    assert state == {"micro": 2}
    _assert_params(engine, at2)
    assert len(messages) == 1
    assert f"{target}: sha256 differs from the manifest" in messages[0]
    assert "resuming from step_00000002 instead" in messages[0]


def test_truncated_file_falls_back(tmp_path, make_engine):
    engine = make_engine()
    at2, _ = _save_two(engine, tmp_path)
    target = tmp_path / "step_00000004" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    size = target.stat().st_size
    with open(target, "r+b") as handle:
        handle.truncate(size // 2)
    state, messages = _load_with_warning(engine, tmp_path)
    assert state == {"micro": 2}
    _assert_params(engine, at2)
    assert len(messages) == 1 and f"{target}: {size // 2} bytes, the manifest says {size}" in messages[0]


def test_broken_state_json_falls_back(tmp_path, make_engine):
    engine = make_engine()
    at2, _ = _save_two(engine, tmp_path)
    target = tmp_path / "step_00000004" / "kdqat_state.json"
    target.write_text('{"micro": 4,')
    state, messages = _load_with_warning(engine, tmp_path)
    assert state == {"micro": 2}
    _assert_params(engine, at2)
    assert len(messages) == 1 and str(target) in messages[0]


def test_state_without_integer_micro_is_rejected(tmp_path):
    (tmp_path / "step_00000001").mkdir()
    root = tmp_path / "step_00000001"
    (root / "kdqat_state.json").write_text('{"micro": "4"}')
    checkpoint.atomic_write_json(root / checkpoint.MANIFEST, checkpoint.build_manifest(str(root)))
    problem = checkpoint.check_tag(str(tmp_path), "step_00000001")
    assert problem.startswith(f"{root / 'kdqat_state.json'}: bad loop state") and "not an integer" in problem


def test_latest_naming_missing_step_falls_back_to_newest_good(tmp_path, make_engine):
    engine = make_engine()
    _, at4 = _save_two(engine, tmp_path)
    (tmp_path / "latest").write_text("step_00000009")
    state, messages = _load_with_warning(engine, tmp_path)
    assert state == {"micro": 4}
    _assert_params(engine, at4)
    assert len(messages) == 1
    assert f"{tmp_path / 'step_00000009'}: the folder does not exist" in messages[0]
    assert "resuming from step_00000004 instead" in messages[0]


def test_good_latest_loads_without_warning(tmp_path, make_engine):
    engine = make_engine()
    _, at4 = _save_two(engine, tmp_path)
    state, messages = _load_with_warning(engine, tmp_path)
    assert state == {"micro": 4} and messages == []
    _assert_params(engine, at4)


def test_no_good_checkpoint_is_a_data_error(tmp_path, make_engine):
    engine = make_engine()
    _save_two(engine, tmp_path)
    (tmp_path / "step_00000004" / MODEL_STATES).write_bytes(b"")
    os.remove(tmp_path / "step_00000002" / checkpoint.MANIFEST)  # as written by an older ds-kdqat
    with pytest.raises(DataError) as raised:
        checkpoint.load(engine, str(tmp_path), 0)
    error = raised.value
    assert error.source == str(tmp_path)
    assert f"{tmp_path / 'step_00000004' / MODEL_STATES}: 0 bytes" in error.message
    assert "no manifest (written by an older ds-kdqat?" in error.message
    assert f"Delete the folder {tmp_path} to restart this stage from step 0" in error.message


def test_empty_or_absent_folder_is_a_fresh_start(tmp_path, make_engine):
    engine = make_engine()
    assert checkpoint.load(engine, str(tmp_path / "absent"), 0) == (None, {})
    (tmp_path / "empty").mkdir()
    assert checkpoint.load(engine, str(tmp_path / "empty"), 0) == (None, {})


def test_deepspeed_failure_on_a_verified_checkpoint_names_the_folder(tmp_path, make_engine):
    engine = make_engine()
    _save_two(engine, tmp_path)
    root = tmp_path / "step_00000004"
    (root / MODEL_STATES).write_bytes(b"not a torch file")
    checkpoint.atomic_write_json(root / checkpoint.MANIFEST, checkpoint.build_manifest(str(root)))
    with pytest.raises(DataError) as raised:
        checkpoint.load(engine, str(tmp_path), 0)
    assert raised.value.source == str(root)
    assert "DeepSpeed could not load" in raised.value.message and "not falling back" in raised.value.message


def test_rng_round_trip_is_exact_and_not_pickle(tmp_path, make_engine):
    engine = make_engine()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # cached Gaussians are part of the state
    checkpoint.save(engine, str(tmp_path), 1, {"micro": 1}, 0, 2)
    after_save = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(),
                  torch.rand(3).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoint.load(engine, str(tmp_path), 0)
    after_load = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(),
                  torch.rand(3).tolist())
    assert after_load == after_save
    record = torch.load(tmp_path / "step_00000001" / "rng_rank0.pt", weights_only=True)
    assert record["format"] == 1 and record["torch"].dtype == torch.uint8
    assert record["numpy"]["key"].shape == (624,) and record["python"]["internal"].shape == (625,)


def test_manifest_covers_every_file_of_the_tag_folder(tmp_path, make_engine):
    engine = make_engine()
    checkpoint.save(engine, str(tmp_path), 3, {"micro": 3}, 0, 2, tensors={"v": torch.ones(2)})
    root = tmp_path / "step_00000003"
    on_disk = sorted(os.path.relpath(os.path.join(parent, name), root)
                     for parent, _, names in os.walk(root) for name in names)
    manifest = json.loads((root / checkpoint.MANIFEST).read_text())
    assert sorted(entry["path"] for entry in manifest["files"]) == [p for p in on_disk if p != checkpoint.MANIFEST]
    assert {MODEL_STATES, "zero_pp_rank_0_mp_rank_00_optim_states.pt", "kdqat_state.json", "kdqat_tensors.pt",
            "rng_rank0.pt"} <= set(on_disk)
    for entry in manifest["files"]:
        assert entry["size"] == (root / entry["path"]).stat().st_size
    assert (tmp_path / "latest").read_text() == "step_00000003"


def test_prune_keeps_latest_and_fallback_and_drops_abandoned_newer(tmp_path, make_engine):
    engine = make_engine()
    _save_two(engine, tmp_path, keep=2)
    (tmp_path / "step_00000004" / MODEL_STATES).write_bytes(b"")
    state, _ = _load_with_warning(engine, tmp_path)
    assert state == {"micro": 2}
    checkpoint.save(engine, str(tmp_path), 3, {"micro": 3}, 0, 2)  # the resumed run saves again
    assert {"latest", "step_00000002", "step_00000003"} <= set(os.listdir(tmp_path))
    assert not (tmp_path / "step_00000004").exists()  # from before the fallback
    checkpoint.save(engine, str(tmp_path), 4, {"micro": 4}, 0, 2)
    assert sorted(t for t in os.listdir(tmp_path) if t.startswith("step_")) == ["step_00000003", "step_00000004"]
    assert checkpoint.check_tag(str(tmp_path), "step_00000004") is None
