"""Small pieces of the job: when the teacher is fine-tuned first, and the atomic replacement of folders."""

import json

import pytest
from transformers import BertConfig, BertForSequenceClassification, BertModel

from ds_kdqat.data.tasks import get_task
from ds_kdqat.pipeline import needs_finetuning, replace_dir, saved_dir, temp_dir


def _save(model_cls, folder, **config):
    model_cls(BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16, **config)).save_pretrained(folder)
    return str(folder)


def test_auto_fine_tunes_unless_the_checkpoint_has_the_tasks_head(tmp_path):
    sst2, stsb, mnli = get_task("sst2"), get_task("stsb"), get_task("mnli")
    encoder = _save(BertModel, tmp_path / "encoder")
    binary_head = _save(BertForSequenceClassification, tmp_path / "binary", num_labels=2)
    assert needs_finetuning(encoder, sst2, "auto", True)
    assert not needs_finetuning(binary_head, sst2, "auto", True)
    assert needs_finetuning(binary_head, mnli, "auto", True)  # three classes: a new head is needed
    assert needs_finetuning(binary_head, stsb, "auto", True)  # regression: one output
    assert needs_finetuning(binary_head, sst2, "always", True)
    assert not needs_finetuning(encoder, sst2, "never", True)


def test_replace_dir_keeps_one_complete_copy(tmp_path):
    target = tmp_path / "student"
    for version in (1, 2):
        new = tmp_path / f"student.tmp{version}"
        new.mkdir()
        (new / "v.json").write_text(json.dumps(version))
        replace_dir(str(new), str(target))
        assert json.loads((target / "v.json").read_text()) == version
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]
    # a kill between the two renames leaves only the moved-aside copy: it is what saved_dir hands out
    (tmp_path / "student").rename(tmp_path / ".student.kdqat-old")
    assert saved_dir(str(target)) == str(tmp_path / ".student.kdqat-old")


def test_replace_dir_carries_a_users_file_over_and_spares_their_old_folders(tmp_path):
    target = tmp_path / "student"
    target.mkdir()
    (target / "v.json").write_text("1")
    (target / "NOTES.md").write_bytes(b"my notes\n")
    users_old = tmp_path / "student.old"  # a name ds-kdqat never uses for its own leftovers
    users_old.mkdir()
    (users_old / "keep.txt").write_text("mine")
    new = tmp_path / temp_dir(str(target)).split("/")[-1]
    new.mkdir()
    (new / "v.json").write_text("2")
    with pytest.warns(UserWarning, match="kept NOTES.md"):
        replace_dir(str(new), str(target))
    assert (target / "v.json").read_text() == "2"
    assert (target / "NOTES.md").read_bytes() == b"my notes\n"
    assert (users_old / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student", "student.old"]


def test_kd_phases_of_teacher_intervention():
    import torch

    from ds_kdqat.distill.config import DistillConfig
    from ds_kdqat.distill.phases import kd_phases
    from ds_kdqat.models.taps import EncoderTaps

    phases, segments = kd_phases(DistillConfig(recipe="ti_gradual"), base_steps=12, num_layers=2,
                                 task_type="classification")
    # TI step = 1/3 of 12 steps, half TI-O then TI-M; then KD-QAT; the LR schedule restarts at KD
    assert [(p.name, p.start, p.end) for p in phases] == [("ti_output", 0, 2), ("ti_map", 2, 4), ("kd", 4, 12)]
    assert segments == [(0, 4), (4, 12)]
    assert "mha_outputs" in phases[0].teacher_record and "attention_maps" in phases[1].teacher_record
    maps = [torch.rand(1, 2, 3, 3), torch.rand(1, 2, 3, 3)]
    interventions = phases[1].interventions(EncoderTaps(attention_maps=maps))
    assert sorted(interventions.attention_maps) == [0, 1] and not interventions.mha_outputs
    assert phases[2].interventions is None
    plain, no_segments = kd_phases(DistillConfig(recipe="map"), 12, 2, "classification")
    assert [(p.name, p.start, p.end) for p in plain] == [("kd", 0, 12)] and no_segments is None


def test_saved_lat_student_is_rebuilt_with_its_second_moments(tmp_path):
    import torch

    from ds_kdqat.quant import QuantConfig, after_optimizer_step, lat_state, quantize_model
    from ds_kdqat.quant.student_files import quantize_saved_student, write_student_files

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=16))
    config = QuantConfig(preset="ternarybert_lat")
    quantize_model(model, config)
    ids = torch.tensor([[2, 5, 7, 3]])
    model(input_ids=ids).logits.sum().backward()
    after_optimizer_step(model)
    assert lat_state(model)  # the LAT quantizers now weight their error by a second moment
    model.save_pretrained(tmp_path)
    write_student_files(model, str(tmp_path), config)

    reloaded = quantize_saved_student(BertForSequenceClassification.from_pretrained(tmp_path), str(tmp_path))
    for key, value in lat_state(model).items():
        torch.testing.assert_close(lat_state(reloaded)[key], value)
    model.eval(), reloaded.eval()
    torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
