"""The opt-in cheaper teacher forward (``kdqat.model.teacher_precision``, issue 14 item 7).

* a bf16 or int8-dynamic teacher's taps are close to the fp32 teacher's (tolerances below, with why);
* the KD step runs with it in every phase of a Teacher-Intervention recipe, its losses are float32 and close to
  those with the fp32 teacher, for an fp32 and a bf16 student;
* the config refuses what cannot run (int8 on a GPU or partitioned under ZeRO-3), naming the key;
* the job reports the fp32 teacher's dev metrics as ``teacher`` and the KD teacher's beside them.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from ds_kdqat.config import parse_config
from ds_kdqat.configtools import from_dict
from ds_kdqat.distill import DistillConfig, kd_forward, kd_phases
from ds_kdqat.errors import ConfigError
from ds_kdqat.models.taps import TAP_NAMES, forward_with_taps
from ds_kdqat.quant import quantize_model
from ds_kdqat.training.teacher import (check_teacher_precision, convert_teacher, linear_weight_count,
                                       teacher_engine_config)
from tests.tiny import make_task_dir, make_tiny_bert, tiny_batch, tiny_bert_classifier, write_config

# Relative L2 error ‖tap − tap_fp32‖ / ‖tap_fp32‖ allowed per tap. bf16 keeps 8 significant bits (unit roundoff
# 2^-9 ≈ 0.2 %); a tap of the 2-layer model is the product of ~10 rounded operations (embeddings, three
# matmuls, softmax, LayerNorms; PyTorch accumulates bf16 matmuls in fp32), so errors of a few roundoffs compound
# to ~0.5-1.2 % (measured); 3 % leaves room for other seeds and CPUs. int8_dynamic rounds every linear's weight
# and input to one of 255 levels per tensor (a step of ~0.4-0.8 % of the tensor's range): ~1-2.3 % on the linear
# outputs (contexts, MHA outputs, scores; measured), far less after the residual and LayerNorm; 6 %.
TOLERANCE = {"bf16": 0.03, "int8_dynamic": 0.06}
# The KD loss terms are sums of such differences' squares: compared with the fp32 teacher's, relative 5 % / 10 %.
LOSS_TOLERANCE = {"bf16": 0.05, "int8_dynamic": 0.10}


def relative_error(value: torch.Tensor, reference: torch.Tensor, keep=None) -> float:
    value, reference = value.float(), reference.float()
    if keep is not None:
        value, reference = value[keep], reference[keep]
    return float((value - reference).norm() / reference.norm().clamp_min(1e-12))


def teacher_in(precision: str, seed: int = 1):
    reference = tiny_bert_classifier(seed=seed).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference, convert_teacher(copy.deepcopy(reference), precision)


@pytest.mark.parametrize("precision", ["bf16", "int8_dynamic"])
def test_taps_of_the_cheaper_teacher_are_close_to_the_fp32_teachers(precision):
    reference, cheap = teacher_in(precision)
    batch = tiny_batch()
    with torch.no_grad():
        want = forward_with_taps(reference, batch, TAP_NAMES)
        got = forward_with_taps(cheap, batch, TAP_NAMES)
    mask = want.attention_mask
    pairs = mask[:, None, :, None] & mask[:, None, None, :]  # padded keys hold each dtype's own mask value
    errors = {"logits": relative_error(got.logits, want.logits)}
    for name in ("attention_maps", "contexts", "mha_outputs", "attention_outputs", "layer_outputs"):
        for index, (a, b) in enumerate(zip(getattr(got, name), getattr(want, name))):
            errors[f"{name}[{index}]"] = relative_error(a, b)
    for index, (a, b) in enumerate(zip(got.attention_scores, want.attention_scores)):
        errors[f"attention_scores[{index}]"] = relative_error(a, b, pairs.expand_as(b))
    assert len(errors) == 1 + 5 * 2 + 1 + 2  # every tap of both layers (+ the embedding output) compared
    assert max(errors.values()) <= TOLERANCE[precision], errors
    expected = torch.bfloat16 if precision == "bf16" else torch.float32  # dynamic int8 linears return fp32
    assert got.layer_outputs[-1].dtype == got.attention_maps[0].dtype == expected


def test_conversions():
    reference, bf16 = teacher_in("bf16")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert convert_teacher(bf16, "fp32") is bf16 and {p.dtype for p in bf16.parameters()} == {torch.float32}
    _, int8 = teacher_in("int8_dynamic")
    quantized = [m for m in int8.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert len(quantized) == 2 * 6 + 2  # Q, K, V, O, FFN in, FFN out per layer; pooler; classifier
    assert not any(type(m) is torch.nn.Linear for m in int8.modules())
    # what the estimator counts as int8 (1 byte each): every nn.Linear weight of the fp32 teacher
    assert linear_weight_count(reference) == sum(m.weight().numel() for m in quantized)


def _phases(recipe: str):
    section = {"recipe": recipe, **({"ti": {"steps": 4}} if recipe.startswith("ti_") else {})}
    config = from_dict(DistillConfig, section, "kdqat.distill")
    phases, _ = kd_phases(config, 12, 2, "classification")
    return phases


@pytest.mark.parametrize("precision, student_dtype", [("bf16", torch.float32), ("bf16", torch.bfloat16),
                                                      ("int8_dynamic", torch.float32)])
def test_kd_step_with_the_cheaper_teacher_in_every_phase(precision, student_dtype):
    reference, cheap = teacher_in(precision)
    student = copy.deepcopy(reference).requires_grad_(True)
    quantize_model(student, {"preset": "ternarybert"})
    student.to(student_dtype).train()
    batch = tiny_batch()
    phases = _phases("ti_gradual")
    assert [p.name for p in phases] == ["ti_output", "ti_map", "kd"]
    for phase in phases:
        torch.manual_seed(0)
        want, want_terms = kd_forward(reference, student, batch, phase)
        student.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        loss, terms = kd_forward(cheap, student, batch, phase)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)  # the losses are computed in fp32
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters()
                   if p.requires_grad and p.grad is not None)
        assert student.bert.encoder.layer[0].attention.self.query.weight.grad is not None
        for name, value in terms.items():
            assert value.dtype == torch.float32, name
            assert abs(float(value) - float(want_terms[name])) <= LOSS_TOLERANCE[precision] * max(
                abs(float(want_terms[name])), 1e-3), (phase.name, name, float(value), float(want_terms[name]))


def test_losses_of_a_bf16_student_are_computed_in_fp32():
    """Both models in bf16 (a bf16 run with a bf16 teacher): every term is still float32 and equals the terms of
    the same bf16 taps cast to fp32 by hand (the sums are not done in bf16)."""
    from ds_kdqat.distill import losses

    reference, teacher = teacher_in("bf16")
    student = copy.deepcopy(reference).to(torch.bfloat16)
    phase = _phases("map_output")[0]
    taps_s = forward_with_taps(student, tiny_batch(), phase.record, layers=phase.record_layers)
    with torch.no_grad():
        taps_t = forward_with_taps(teacher, tiny_batch(), phase.teacher_record, layers=phase.teacher_layers)
    assert taps_s.attention_maps[0].dtype == torch.bfloat16
    loss, terms = phase.objective(taps_s, taps_t, None)
    assert loss.dtype == torch.float32
    mask = taps_s.attention_mask
    by_hand = sum(losses.layer_output_mse(s.float(), t.float(), mask)
                  for s, t in zip(taps_s.layer_outputs, taps_t.layer_outputs))
    assert torch.equal(terms["layer_output"], by_hand.detach())


# -- config -----------------------------------------------------------------------------------------------------

def _ds(stage: int = 0, **model) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage},
            "kdqat": {"model": model}}


def test_teacher_precision_is_validated_naming_the_key():
    assert parse_config(_ds()).kdqat.model.teacher_precision == "fp32"
    with pytest.raises(ConfigError, match=r'^kdqat\.model\.teacher_precision: .*"int8"'):
        parse_config(_ds(teacher_precision="int8"))
    with pytest.raises(ConfigError, match=r"^kdqat\.model\.teacher_precision: .*partition_teacher to false"):
        parse_config(_ds(3, teacher_precision="int8_dynamic"))
    # replicated under ZeRO-3, or at stages 0-2: accepted
    assert parse_config(_ds(3, teacher_precision="int8_dynamic", partition_teacher=False)).teacher_partitioned is False
    assert parse_config(_ds(2, teacher_precision="int8_dynamic")).kdqat.model.teacher_precision == "int8_dynamic"
    assert parse_config(_ds(3, teacher_precision="bf16")).teacher_partitioned
    with pytest.raises(ConfigError, match=r'^kdqat\.model\.teacher_precision: .*CPU only.*cuda.*"bf16"'):
        check_teacher_precision("int8_dynamic", "cuda", partitioned=False)
    check_teacher_precision("bf16", "cuda", partitioned=True)


def test_the_partitioned_teachers_engine_gets_bf16_only_when_asked():
    run = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "bf16": {"enabled": True},
           "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}, "gradient_clipping": 1.0}
    fp32 = teacher_engine_config(run, "fp32")
    assert fp32 == {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
                    "zero_optimization": run["zero_optimization"]}  # fp32 even in a bf16 run
    assert teacher_engine_config({**run, "bf16": {"enabled": False}}, "bf16")["bf16"] == {"enabled": True}


# -- the job: what results.json reports ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_rank():
    from tests.tiny import offline_one_rank_group

    with offline_one_rank_group():
        yield


@pytest.fixture(scope="module")
def job_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return make_tiny_bert(root / "bert"), make_task_dir(root / "task", n_train=32, n_dev=16)


def _job(root, assets, precision: str) -> dict:
    from ds_kdqat import pipeline
    from ds_kdqat.config import load_config

    bert, task = assets
    # teacher_finetune "never" on a checkpoint without a head: the KD teacher's head is initialised from the seed
    model = {"teacher": str(bert), "teacher_finetune": "never", "local_files_only": True,
             "teacher_precision": precision}
    config = write_config(root / f"{precision}.json", bert, task, root / precision, model=model,
                          train={"epochs": 1, "learning_rate": 5e-4, "max_steps": 3},
                          logging={"log_every": 1, "save_every": 100, "progress": False})
    results = pipeline.run_job(load_config(str(config)))
    assert json.loads((root / precision / "results.json").read_text()) == results
    return results


@pytest.fixture(scope="module")
def fp32_job(one_rank, job_assets, tmp_path_factory):
    return _job(tmp_path_factory.mktemp("fp32"), job_assets, "fp32")


@pytest.mark.parametrize("precision", ["bf16", "int8_dynamic"])
def test_the_job_reports_the_fp32_teacher_and_the_kd_teacher(fp32_job, job_assets, tmp_path, precision):
    from ds_kdqat import pipeline

    assert fp32_job["teacher_precision"] == "fp32" and "teacher_kd" not in fp32_job
    results = _job(tmp_path, job_assets, precision)
    assert results["teacher_precision"] == precision
    # "teacher" is the fp32 teacher, exactly as the fp32 job reports it (the same model, re-loaded the same way)
    assert results["teacher_by_split"] == fp32_job["teacher_by_split"]
    assert set(results["teacher_kd_by_split"]) == {"dev"} and results["teacher_kd"] == results["teacher_kd_by_split"][
        "dev"]
    assert abs(results["teacher_kd"]["accuracy"] - results["teacher"]["accuracy"]) <= 2 / 16  # ≤ 2 of 16 flipped
    assert f"{precision} KD teacher accuracy" in pipeline.format_results(results)
    # the student trained against it and was exported as usual
    assert results["steps"]["kdqat"] == 3 and (tmp_path / precision / "student_packed" / "manifest.json").is_file()
