"""Teacher Intervention as the paper describes it (issue 14).

* TI-O / TI-M train every student parameter: the internal terms (``ti_mha_output``, ``ti_attention_map``) put a
  loss on the student's own tensor at the intervened point, so the parameters behind it keep training; the
  gradient guard (``ds_kdqat.distill.gradients``) names any trainable parameter a phase leaves without gradient,
  and no shipped recipe or config leaves one (except what a phase documents as frozen on purpose);
* the internal TI-O term is the MSE of ``Concat(student context)·W_O + b_O`` with the teacher's MHA output;
* the TI step is at most one epoch (``ti.max_epochs``), ``ti.steps`` / ``ti.step_fraction`` / ``ti.output_fraction``
  set its length and split; config errors name their key;
* ``ti.convergence`` ends a TI phase when its loss plateaus, at the step the criterion says; a run resumed from a
  checkpoint continues identically (loop level, and the real KD-QAT stage on a tiny BERT).
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path

import pytest
import torch

from ds_kdqat.configtools import from_dict
from ds_kdqat.distill import DistillConfig, TeacherInterventionConfig, kd_forward, kd_phases
from ds_kdqat.distill.config import ConvergenceConfig
from ds_kdqat.distill.gradients import (compact_names, frozen_on_purpose, phase_gradient_report,
                                        unreached_parameters)
from ds_kdqat.distill.recipes import RECIPES
from ds_kdqat.distill.schedule import PhaseSpan, PlateauCriterion, build_interventions, plan_training, replan
from ds_kdqat.errors import ConfigError
from ds_kdqat.models.taps import forward_with_taps
from ds_kdqat.quant import quantize_model
from ds_kdqat.training.callbacks import EarlyPhaseEnd, LoopState
from ds_kdqat.training.loop import run_loop
from tests.tiny import REPO, make_task_dir, make_tiny_bert, tiny_batch, tiny_bert_classifier, write_config

TI_RECIPES = ["ti_output", "ti_map", "ti_gradual"]


def spans(phases):
    return [(p.phase if isinstance(p, PhaseSpan) else p.name, p.start, p.end) for p in phases]


def student_of(teacher, preset="ternarybert"):
    student = copy.deepcopy(teacher)
    quantize_model(student, {"preset": preset})
    return student.train()


def gradients_of_each_phase(teacher, student, batch, phases):
    """{phase: (parameters whose gradient is missing or zero, frozen_on_purpose)} after one backward per phase."""
    out = {}
    for phase in phases:
        student.zero_grad(set_to_none=True)
        loss, _ = kd_forward(teacher, student, batch, phase)
        loss.backward()
        without = {name for name, p in student.named_parameters()
                   if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)}
        out[phase.name] = (without, set(frozen_on_purpose(phase, student)))
    return out


# -- every parameter trains in every phase -------------------------------------------------------------------

@pytest.mark.parametrize("kd_recipe", ["ternarybert", "output"])
@pytest.mark.parametrize("recipe", TI_RECIPES)
def test_every_trainable_parameter_gets_gradient_in_every_ti_phase(recipe, kd_recipe):
    teacher = tiny_bert_classifier().eval()
    student = student_of(teacher)
    config = DistillConfig(recipe=recipe, ti=TeacherInterventionConfig(kd_recipe=kd_recipe))
    phases, _ = kd_phases(config, 12, 2, "classification")
    seen = gradients_of_each_phase(teacher, student, tiny_batch(), phases)
    assert set(seen) == ({"ti_output", "ti_map", "kd"} if recipe == "ti_gradual" else {recipe, "kd"})
    for phase, (without, frozen) in seen.items():
        assert without == set() and frozen == set(), (phase, sorted(without))


@pytest.mark.parametrize("recipe", ["ti_map", "ti_gradual"])
def test_lsq_map_step_is_the_one_documented_freeze_of_ti_m(recipe):
    """With a learned-step map quantizer (LSQ), TI-M uses the teacher's map as given: that step is frozen there,
    documented by frozen_on_purpose; everything else trains."""
    teacher = tiny_bert_classifier().eval()
    student = student_of(teacher, "ternarybert_lsq")
    phases, _ = kd_phases(DistillConfig(recipe=recipe), 12, 2, "classification")
    for phase, (without, frozen) in gradients_of_each_phase(teacher, student, tiny_batch(), phases).items():
        expected = {f"bert.encoder.layer.{l}.attention.self.kdqat_act_quant.map.step_delta" for l in (0, 1)}
        assert without == frozen == (expected if phase == "ti_map" else set()), phase


def test_the_internal_terms_are_what_trains_v_wo_and_qk_and_the_guard_names_them_when_off():
    teacher = tiny_bert_classifier().eval()
    student = student_of(teacher)
    config = DistillConfig(recipe="ti_gradual", ti=TeacherInterventionConfig(kd_recipe="output"),
                           weights={"ti_mha_output": 0.0, "ti_attention_map": 0.0})
    phases, _ = kd_phases(config, 12, 2, "classification")
    assert all(not {"ti_mha_output", "ti_attention_map"} & set(p.objective.coefficients) for p in phases)
    reports = {}
    for phase in phases:
        loss, terms = kd_forward(teacher, student, tiny_batch(), phase)
        reports[phase.name] = phase_gradient_report(loss, student, phase)
    attention = "bert.encoder.layer.{0,1}.attention."
    assert compact_names(reports["ti_output"][0]) == [
        attention + name for name in ("self.query.weight", "self.query.bias", "self.key.weight", "self.key.bias",
                                      "self.value.weight", "self.value.bias", "output.dense.weight",
                                      "output.dense.bias")]
    assert compact_names(reports["ti_map"][0]) == [attention + name for name in (
        "self.query.weight", "self.query.bias", "self.key.weight", "self.key.bias")]
    assert reports["kd"] == ([], {})

    on = kd_phases(DistillConfig(recipe="ti_gradual"), 12, 2, "classification")[0]
    assert on[0].objective.coefficients["ti_mha_output"] == 1.0 and on[1].objective.coefficients[
        "ti_attention_map"] == 1.0
    _, terms = kd_forward(teacher, student, tiny_batch(), on[0])
    assert "ti_mha_output" in terms and "ti_attention_map" not in terms  # logged per phase


def test_guard_finds_exactly_the_parameters_a_detached_replacement_cuts_off():
    """unreached_parameters walks the graph only: no gradient is computed, .grad stays untouched."""
    teacher = tiny_bert_classifier().eval()
    student = student_of(teacher)
    with torch.no_grad():
        t = forward_with_taps(teacher, tiny_batch(), {"mha_outputs"})
    s = forward_with_taps(student, tiny_batch(), set(), build_interventions("ti_output", t, layers=[1]))
    loss = s.logits.sum()
    cut = unreached_parameters(loss, student)
    assert compact_names(cut) == [f"bert.encoder.layer.1.attention.{name}" for name in (
        "self.query.weight", "self.query.bias", "self.key.weight", "self.key.bias", "self.value.weight",
        "self.value.bias", "output.dense.weight", "output.dense.bias")]
    assert all(p.grad is None for p in student.parameters())


class _StubEngine:
    """What TeacherStudentEngine.micro_step uses of DeepSpeed's engine: the module, its device, forward,
    backward and step."""

    def __init__(self, module):
        self.module, self.device, self.steps = module, torch.device("cpu"), 0

    def __call__(self, **inputs):
        return self.module(**inputs)

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.steps += 1


def test_the_engine_warns_once_per_phase_naming_the_parameters_without_gradient():
    import types

    from ds_kdqat.engine import NoGradientWarning, TeacherStudentEngine

    teacher = tiny_bert_classifier().eval()
    student = student_of(teacher)
    config = DistillConfig(recipe="ti_gradual", weights={"ti_mha_output": 0.0})
    phases, _ = kd_phases(config, 12, 2, "classification")
    fake = types.SimpleNamespace(dist=types.SimpleNamespace(is_main=True), stage="kdqat", teacher=teacher,
                                 engine=_StubEngine(student), _gradient_checked=set())
    fake.check_gradients = types.MethodType(TeacherStudentEngine.check_gradients, fake)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for phase in [phases[0], phases[0], phases[1], phases[2], phases[2]]:
            TeacherStudentEngine.micro_step(fake, tiny_batch(), phase)
    found = [str(w.message) for w in caught if issubclass(w.category, NoGradientWarning)]
    assert len(found) == 1 and fake.engine.steps == 5 and fake._gradient_checked == {"ti_output", "ti_map", "kd"}
    assert found[0].startswith("kdqat:ti_output: 8 trainable parameter(s) receive no gradient in this phase: "
                               "bert.encoder.layer.{0,1}.attention.self.value.weight, ")
    fake.dist.is_main = False  # only the main rank checks
    assert fake.check_gradients(kd_forward(teacher, student, tiny_batch(), phases[0])[0], phases[0]) == []


ZERO_SCRIPT = """
import copy, json, os, sys, torch
from ds_kdqat.training.distributed import init_distributed
init_distributed()
import deepspeed
from tests.tiny import tiny_bert_classifier, tiny_batch
from ds_kdqat.distill import DistillConfig, kd_phases, kd_forward
from ds_kdqat.distill.gradients import phase_gradient_report
from ds_kdqat.quant import quantize_model
teacher = tiny_bert_classifier().eval()
student = copy.deepcopy(teacher)
quantize_model(student, {"preset": "ternarybert"})
engine, *_ = deepspeed.initialize(model=student, optimizer=torch.optim.AdamW(student.parameters(), 1e-3), config={
    "train_micro_batch_size_per_gpu": 2, "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 6,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
assert all(hasattr(p, "ds_id") for p in engine.module.parameters())
out = {}
for weight in (1.0, 0.0):
    phases, _ = kd_phases(DistillConfig(recipe="ti_gradual", weights={"ti_mha_output": weight}), 12, 2,
                          "classification")
    for phase in phases:
        loss, _ = kd_forward(teacher, engine, tiny_batch(), phase)
        out[f"{weight}:{phase.name}"] = len(phase_gradient_report(loss, engine.module, phase)[0])
        engine.backward(loss)
        engine.step()
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_the_gradient_check_works_under_zero3(tmp_path):
    import subprocess
    import sys

    from tests.tiny import train_env

    script = tmp_path / "zero3.py"
    script.write_text(ZERO_SCRIPT)
    env = dict(train_env(), PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(script)], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads(lines[-1][len("RESULT "):]) == {"1.0:ti_output": 0, "1.0:ti_map": 0, "1.0:kd": 0,
                                                      "0.0:ti_output": 8, "0.0:ti_map": 0, "0.0:kd": 0}


# -- every shipped recipe and config --------------------------------------------------------------------------

def _tiny_model(family: str, task_type: str):
    from transformers import BertConfig, BertForQuestionAnswering, T5Config, ViTConfig, ViTForImageClassification

    from ds_kdqat.models.families.t5 import KdqatT5EncoderForSequenceClassification

    torch.manual_seed(0)
    labels = 1 if task_type == "regression" else 2 if task_type == "qa" else 3
    if family == "vit":
        config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           image_size=8, patch_size=4, num_channels=1, num_labels=labels)
        return ViTForImageClassification(config).eval()
    if family == "t5":  # t5-v1_1: gated FFN
        config = T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                          feed_forward_proj="gated-gelu", num_labels=labels)
        return KdqatT5EncoderForSequenceClassification(config).eval()
    config = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=32, num_labels=labels, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    if task_type == "qa":
        return BertForQuestionAnswering(BertConfig(**config)).eval()
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(**config)).eval()


def _batch(family: str):
    if family == "vit":
        return {"pixel_values": torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(3))}
    batch = tiny_batch()
    return {k: v for k, v in batch.items() if k != "labels"}


SHIPPED = sorted((REPO / "ds_configs").glob("*.json"))


def _family(teacher: str) -> str:
    return "vit" if "vit" in teacher else "t5" if "t5" in teacher else "bert"


def _task_type(data: dict) -> str:
    return "qa" if data.get("task") == "squad" else data.get("task_type", "classification")


def _check_every_phase(teacher, student, batch, phases):
    """Every trainable parameter reachable in every phase except the documented freezes; returns the freezes."""
    freezes = {}
    for phase in phases:
        student.zero_grad(set_to_none=True)
        loss, _ = kd_forward(teacher, student, batch, phase)
        missing, on_purpose = phase_gradient_report(loss, student, phase)
        assert missing == [], (phase.name, compact_names(missing))
        loss.backward()
        zero = {n for n, p in student.named_parameters() if p.requires_grad and not (
            p.grad is not None and p.grad.abs().sum() > 0)}
        assert zero == set(on_purpose), (phase.name, sorted(zero ^ set(on_purpose)))
        freezes[phase.name] = sorted(on_purpose)
    return freezes


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_no_shipped_config_leaves_a_parameter_without_gradient(path):
    kdqat = json.loads(path.read_text())["kdqat"]
    family, task_type = _family(kdqat["model"]["teacher"]), _task_type(kdqat["data"])
    distill = from_dict(DistillConfig, kdqat.get("distill", {}), "kdqat.distill")
    teacher = _tiny_model(family, task_type)
    student = copy.deepcopy(teacher)
    quantize_model(student, kdqat.get("quant", {}))
    student.train()
    phases, _ = kd_phases(distill, 30, 2, task_type, steps_per_epoch=10)
    freezes = _check_every_phase(teacher, student, _batch(family), phases)
    if path.name == "squad_v1.json":  # stage 1 has no term on the span logits: the QA head waits for stage 2
        assert freezes == {"kd_stage1": ["qa_outputs.bias", "qa_outputs.weight"], "kd_stage2": []}
    else:
        assert all(not names for names in freezes.values()), freezes
    if distill.is_teacher_intervention:
        assert [p.name for p in phases] == ["ti_output", "ti_map", "kd"] and phases[1].end == 10  # one epoch


@pytest.mark.parametrize("preset", ["ternarybert", "ternarybert_lsq"])
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_no_registered_recipe_leaves_a_parameter_without_gradient(recipe, preset):
    teacher = tiny_bert_classifier().eval()
    student = student_of(teacher, preset)
    extra = {"terms": ["pred", "attention_output"]} if recipe == "custom" else {}
    phases, _ = kd_phases(DistillConfig(recipe=recipe, **extra), 12, 2, "classification")
    freezes = _check_every_phase(teacher, student, tiny_batch(), phases)
    lsq_map = [f"bert.encoder.layer.{l}.attention.self.kdqat_act_quant.map.step_delta" for l in (0, 1)]
    for phase, names in freezes.items():
        assert names == (lsq_map if phase == "ti_map" and preset == "ternarybert_lsq" else []), phase


# -- the internal term by hand ---------------------------------------------------------------------------------

def _masked_mse(a, b, mask):
    m = mask.to(a.dtype)[..., None]
    return ((a - b) ** 2 * m).sum() / (m.sum() * a.shape[-1])


@pytest.mark.parametrize("quantized", [False, True])
def test_ti_mha_output_is_the_mse_of_w_o_times_the_students_own_context(quantized):
    teacher = tiny_bert_classifier(seed=0).eval()
    student = tiny_bert_classifier(seed=1).train()  # other weights: the term is far from 0
    if quantized:
        quantize_model(student, {"preset": "ternarybert"})
    batch = tiny_batch()
    phase = kd_phases(DistillConfig(recipe="ti_output"), 12, 2, "classification")[0][0]
    assert phase.name == "ti_output"
    _, terms = kd_forward(teacher, student, batch, phase)

    with torch.no_grad():
        t = forward_with_taps(teacher, batch, {"mha_outputs"})
        s = forward_with_taps(student, batch, {"contexts", "attention_outputs", "layer_outputs"},
                              build_interventions("ti_output", t))
        expected = 0.0
        for l, layer in enumerate(student.bert.encoder.layer):
            context = s.contexts[l]  # (B, H, S, D_h): the student's own map·V
            b, h, n, d = context.shape
            concat = context.transpose(1, 2).reshape(b, n, h * d)
            dense = layer.attention.output.dense
            if quantized:  # W_O is ternary and its input 8-bit: the quantized module is "W_O·x + b"
                own = dense(concat)
            else:
                own = concat @ dense.weight.T + dense.bias
            expected += _masked_mse(own, t.mha_outputs[l], batch["attention_mask"])
            # what flows on is the teacher's MHA output (dropout off): Y_l = LayerNorm(X_l + teacher MHA)
            norm = layer.attention.output.LayerNorm
            torch.testing.assert_close(s.attention_outputs[l], norm(s.layer_outputs[l] + t.mha_outputs[l]))
    assert float(expected) > 1e-4
    torch.testing.assert_close(terms["ti_mha_output"], expected, rtol=1e-6, atol=0)


def test_ti_attention_map_is_the_kl_of_the_students_own_map():
    teacher = tiny_bert_classifier(seed=0).eval()
    student = tiny_bert_classifier(seed=1).train()
    batch = tiny_batch()
    phase = kd_phases(DistillConfig(recipe="ti_map"), 12, 2, "classification")[0][0]
    _, terms = kd_forward(teacher, student, batch, phase)
    with torch.no_grad():
        t = forward_with_taps(teacher, batch, {"attention_maps"})
        s = forward_with_taps(student, batch, {"attention_maps"}, build_interventions("ti_map", t))
    expected = 0.0
    lengths = batch["attention_mask"].sum(-1).tolist()
    for l in range(2):
        per_sequence = []
        for i, n in enumerate(lengths):
            tm, sm = t.attention_maps[l][i, :, :n, :n], s.attention_maps[l][i, :, :n, :n]
            tm = tm / tm.sum(-1, keepdim=True)  # the teacher's rows renormalised over the real keys (losses.py)
            per_sequence.append((tm * (tm.log() - sm.log())).sum(-1).mean())  # rows, then heads
        expected += sum(per_sequence) / len(per_sequence)
    assert float(expected) > 1e-4
    torch.testing.assert_close(terms["ti_attention_map"], expected, rtol=1e-5, atol=0)


# -- the length of the TI step ---------------------------------------------------------------------------------

def test_ti_step_is_at_most_one_epoch_by_default():
    # budget O4 of a 3-epoch base schedule of 100 steps per epoch: 1200 steps; a third would be 4 epochs
    plan = plan_training(DistillConfig(recipe="ti_gradual", budget="O4"), 300, steps_per_epoch=100)
    assert spans(plan.phases) == [("ti_output", 0, 50), ("ti_map", 50, 100), ("kd", 100, 1200)]
    phases, segments = kd_phases(DistillConfig(recipe="ti_gradual", budget="O4"), 300, 2, "classification",
                                 steps_per_epoch=100)
    assert spans(phases) == spans(plan.phases) and segments == [(0, 100), (100, 1200)]
    # budget O: a third of three epochs is one epoch, the cap does not bind
    assert spans(plan_training(DistillConfig(recipe="ti_output"), 300, 100).phases) == [("ti_output", 0, 100),
                                                                                       ("kd", 100, 300)]
    uncapped = DistillConfig(recipe="ti_map", budget="O4", ti=TeacherInterventionConfig(max_epochs=None))
    assert spans(plan_training(uncapped, 300, 100).phases) == [("ti_map", 0, 400), ("kd", 400, 1200)]
    wider = DistillConfig(recipe="ti_map", budget="O4", ti=TeacherInterventionConfig(max_epochs=2.5))
    assert spans(plan_training(wider, 300, 100).phases) == [("ti_map", 0, 250), ("kd", 250, 1200)]


def test_ti_length_in_steps_or_fraction_and_the_split_are_configurable_end_to_end():
    config = from_dict(DistillConfig, {"recipe": "ti_gradual", "ti": {"steps": 40, "output_fraction": 0.25}},
                       "kdqat.distill")
    phases, segments = kd_phases(config, 300, 2, "classification", steps_per_epoch=100)
    assert spans(phases) == [("ti_output", 0, 10), ("ti_map", 10, 40), ("kd", 40, 300)]
    assert segments == [(0, 40), (40, 300)]
    fraction = from_dict(DistillConfig, {"recipe": "ti_output", "ti": {"step_fraction": 0.1}}, "kdqat.distill")
    assert spans(plan_training(fraction, 300, 100).phases) == [("ti_output", 0, 30), ("kd", 30, 300)]
    with pytest.warns(UserWarning, match=r"ti.steps=150 asks for a TI step of 150 steps; ti.max_epochs=1 caps it"):
        capped = plan_training(DistillConfig(recipe="ti_output", ti=TeacherInterventionConfig(steps=150)), 300, 100)
    assert spans(capped.phases) == [("ti_output", 0, 100), ("kd", 100, 300)]
    with pytest.warns(UserWarning, match=r"ti.steps=500 is more than the run's 300 steps"):
        whole = plan_training(DistillConfig(recipe="ti_map", ti=TeacherInterventionConfig(steps=500, max_epochs=None)),
                              300, 100)
    assert spans(whole.phases) == [("ti_map", 0, 300)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default fraction capped by default: no warning
        plan_training(DistillConfig(recipe="ti_output", budget="O4"), 300, 100)


@pytest.mark.parametrize("data, path, message", [
    ({"recipe": "ti_map", "ti": {"steps": -1}}, "kdqat.distill.ti.steps", "integer >= 0"),
    ({"recipe": "ti_map", "ti": {"steps": 10, "step_fraction": 0.5}}, "kdqat.distill.ti.steps", "set one of them"),
    ({"recipe": "ti_map", "ti": {"max_epochs": 0}}, "kdqat.distill.ti.max_epochs", "number > 0"),
    ({"recipe": "ti_map", "ti": {"max_epochs": "one"}}, "kdqat.distill.ti.max_epochs", "expected"),
    ({"recipe": "ti_map", "ti": {"convergence": {"window": 0}}}, "kdqat.distill.ti.convergence.window", ">= 1"),
    ({"recipe": "ti_map", "ti": {"convergence": {"threshold": -0.1}}}, "kdqat.distill.ti.convergence.threshold",
     ">= 0"),
    ({"recipe": "ti_map", "ti": {"convergence": {"min_steps": -2}}}, "kdqat.distill.ti.convergence.min_steps",
     ">= 0"),
    ({"recipe": "ti_map", "ti": {"convergence": {"unused_steps": "keep"}}},
     "kdqat.distill.ti.convergence.unused_steps", '"drop", "kd"'),
    ({"recipe": "ti_map", "ti": {"convergence": {"patience": 3}}}, "kdqat.distill.ti.convergence.patience",
     "unknown key"),
    ({"recipe": "ternarybert", "ti": {"convergence": {"enabled": True}}},
     "kdqat.distill.ti.convergence.enabled", "only used by the Teacher-Intervention recipes"),
    ({"recipe": "map", "ti": {"steps": 10}}, "kdqat.distill.ti.steps", "only used by the Teacher-Intervention"),
    ({"recipe": "custom", "terms": ["pred", "ti_mha_output"]}, "kdqat.distill.terms[1]",
     "internal term of the Teacher-Intervention phase \"ti_output\""),
    ({"recipe": "custom", "stages": [{"terms": ["ti_attention_map"]}]}, "kdqat.distill.stages[0].terms[0]",
     "weights.ti_attention_map"),
    ({"recipe": "ti_gradual", "weights": {"ti_mha_output": -1}}, "kdqat.distill.weights.ti_mha_output", ">= 0"),
])
def test_ti_config_errors_name_the_key(data, path, message):
    with pytest.raises(ConfigError) as error:
        from_dict(DistillConfig, data, "kdqat.distill")
    assert error.value.path == path and message in error.value.message, str(error.value)


# -- the convergence criterion ---------------------------------------------------------------------------------

# Window 3, threshold 5 %: the mean of the last 3 step losses against the mean of the 3 before, from step 6 on:
# n=6: 9 → 6.567 (27 %), 7: 21.7 %, 8: 14.6 %, 9: 6.567 → 6.05 (7.9 %), 10: 6.267 → 6.01 (4.1 % < 5 %): plateau.
LOSSES = [10, 9, 8, 7, 6.5, 6.2, 6.1, 6.05, 6.0, 5.98] + [5.97 - 0.01 * i for i in range(40)]
CONVERGENCE = ConvergenceConfig(enabled=True, window=3, threshold=0.05)


def test_plateau_criterion_fires_at_the_expected_step_and_resumes_from_its_state():
    criterion = PlateauCriterion(CONVERGENCE)
    fired = [n for n, loss in enumerate(LOSSES, start=1) if criterion.update("ti_output", loss)]
    assert fired[0] == 10
    late = PlateauCriterion(ConvergenceConfig(enabled=True, window=3, threshold=0.05, min_steps=12))
    assert next(n for n, loss in enumerate(LOSSES, start=1) if late.update("ti_map", loss)) == 12
    strict = PlateauCriterion(ConvergenceConfig(enabled=True, window=3, threshold=0.0))  # only a rise stops it
    assert not any(strict.update("ti_map", loss) for loss in LOSSES)

    first, second = PlateauCriterion(CONVERGENCE), PlateauCriterion(CONVERGENCE)
    assert not any(first.update("ti_output", loss) for loss in LOSSES[:7])
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))  # as kdqat_state.json carries it
    assert [second.update("ti_output", loss) for loss in LOSSES[7:10]] == [False, False, True]
    assert not second.update("ti_map", LOSSES[0])  # a new phase starts afresh


def test_replan_moves_the_phases_after_an_early_end():
    planned = (PhaseSpan("ti_output", 0, 50), PhaseSpan("ti_map", 50, 100), PhaseSpan("kd", 100, 300))
    drop = replan(planned, {"ti_output": 10})
    assert spans(drop.phases) == [("ti_output", 0, 10), ("ti_map", 10, 60), ("kd", 60, 260)] and drop.total_steps == 260
    to_kd = replan(planned, {"ti_output": 10, "ti_map": 30}, "kd")
    assert spans(to_kd.phases) == [("ti_output", 0, 10), ("ti_map", 10, 30), ("kd", 30, 300)]
    only_ti = replan((PhaseSpan("ti_map", 0, 20),), {"ti_map": 5}, "kd")
    assert spans(only_ti.phases) == [("ti_map", 0, 5), ("kd", 5, 20)]
    with pytest.raises(ValueError, match="only Teacher-Intervention phases end early"):
        replan(planned, {"kd": 120})
    with pytest.raises(ValueError, match="cannot end at step 70"):
        replan(planned, {"ti_output": 70})


class Recorder:
    def __init__(self, stop_at=None):
        self.steps, self.stop_at = [], stop_at

    def on_train_begin(self, state): pass

    def on_micro_end(self, state): pass

    def on_step_end(self, state):
        self.steps.append((state.step, state.phase.name, state.terms["total"]))
        if state.step == self.stop_at:
            state.stopping = True

    def on_train_end(self, state): pass


def _loop(unused_steps, start_state=None, stop_at=None):
    """The loop with an early-ending TI phase; step losses are LOSSES (TI) and 1.0 (KD). Returns the recorder,
    the saved part of the callback, the phases and the loop state."""
    config = DistillConfig(recipe="ti_output", ti=TeacherInterventionConfig(
        steps=30, convergence=ConvergenceConfig(enabled=True, window=3, threshold=0.05, unused_steps=unused_steps)))
    phases, _ = kd_phases(config, 60, 2, "classification")
    assert spans(phases) == [("ti_output", 0, 30), ("kd", 30, 60)]

    def replanned(state):
        state.total_steps = phases.total_steps

    early = EarlyPhaseEnd(phases, 1, replanned)
    state = LoopState(micro=0, step=0, total_steps=phases.total_steps)
    if start_state is not None:  # as the engine resumes: the callbacks' state, then the plan
        early.load_state_dict(start_state["saved"])
        state = LoopState(micro=start_state["micro"], step=start_state["micro"] // 2, total_steps=phases.total_steps)
    recorder = Recorder(stop_at)

    def step(batch, phase):  # two micro batches per step, the step's loss is their mean
        index = batch // 2
        return {"total": LOSSES[index] + (0.5 if batch % 2 else -0.5) if phase.name != "kd" else 1.0}

    batches = iter(range(state.micro, 10_000))
    run_loop(batches, step, phases, state, 2, [early, recorder])
    return recorder, early.state_dict(), phases, state


@pytest.mark.parametrize("unused_steps, total", [("drop", 40), ("kd", 60)])
def test_a_ti_phase_ends_on_plateau_and_a_resumed_loop_continues_identically(unused_steps, total):
    recorder, saved, phases, state = _loop(unused_steps)
    assert spans(phases) == [("ti_output", 0, 10), ("kd", 10, total)] and state.step == total
    assert [name for _, name, _ in recorder.steps] == ["ti_output"] * 10 + ["kd"] * (total - 10)
    assert saved["ti_convergence"]["ended"] == {"ti_output": 10}
    for stop in (7, 10, 13):  # mid TI step, at its early end, in KD-QAT after it
        first, part, _, stopped = _loop(unused_steps, stop_at=stop)
        assert stopped.step == stop
        second, _, resumed, end = _loop(unused_steps, {"saved": json.loads(json.dumps(part)), "micro": 2 * stop})
        assert first.steps + second.steps == recorder.steps
        assert spans(resumed) == spans(phases) and end.step == total


# -- the real KD-QAT stage: early end, then resume from a checkpoint -------------------------------------------

@pytest.fixture(scope="module")
def one_rank():
    """A one-rank gloo group for this module; undone after."""
    from tests.tiny import one_rank_group

    with one_rank_group(HF_HUB_OFFLINE="1", TORCH_EXTENSIONS_DIR=os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))):
        yield


def _kd_stage(config_path: Path):
    """The job's KD-QAT stage in this process; returns (engine, result)."""
    from ds_kdqat import pipeline
    from ds_kdqat.config import load_config

    ctx = pipeline.prepare(load_config(str(config_path)))
    try:
        return pipeline.train_student(ctx, pipeline.finetune_teacher(ctx))
    finally:
        ctx.release()


def _log_rows(out: Path):
    from ds_kdqat.training.logger import read_log_table

    return [{k: v for k, v in row.items() if k != "seconds"} for row in read_log_table(out / "log.csv")[1]]


def test_kd_qat_stage_ends_ti_early_and_resumes_in_kd_identically(one_rank, tmp_path):
    from ds_kdqat.engine import NoGradientWarning

    out = tmp_path / "out"
    config = write_config(
        tmp_path / "c.json", make_tiny_bert(tmp_path / "bert"), make_task_dir(tmp_path / "task", n_train=48),
        out, model={"teacher": str(tmp_path / "bert"), "teacher_finetune": "never", "local_files_only": True},
        distill={"recipe": "ti_gradual", "ti": {"steps": 12, "max_epochs": 2,
                                                "convergence": {"enabled": True, "window": 2, "threshold": 1.0}}},
        logging={"log_every": 1, "save_every": 2, "keep_checkpoints": 50, "progress": False},
        train={"epochs": 4, "learning_rate": 5e-4})
    # 48 examples / 8 = 6 steps per epoch, 4 epochs: 24 steps; the TI step 12 (two epochs, allowed by max_epochs):
    # TI-O 6, TI-M 6, KD 12. Window 2, threshold 1: every check fires, i.e. at a phase's 4th step.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine, result = _kd_stage(config)
    assert not [w for w in caught if issubclass(w.category, NoGradientWarning)], [str(w.message) for w in caught]
    rows = _log_rows(out)
    train = [(int(r["step"]), r["phase"]) for r in rows if r["split"] == "train"]
    # 24 planned steps: TI-O 0-6, TI-M 6-12, KD 12-24; TI-O ended at 4, TI-M at 8, KD keeps its 12 steps
    assert train == [(s, "kdqat:ti_output") for s in range(1, 5)] + [(s, "kdqat:ti_map") for s in range(5, 9)] + \
        [(s, "kdqat:kd") for s in range(9, 21)]
    logged = {phase: [r for r in rows if r["phase"] == f"kdqat:{phase}" and r["split"] == "train"]
              for phase in ("ti_output", "ti_map", "kd")}
    assert all("ti_mha_output" in r and "ti_attention_map" not in r for r in logged["ti_output"])
    assert all("ti_attention_map" in r and "ti_mha_output" not in r for r in logged["ti_map"])
    assert all("ti_attention_map" not in r and "ti_mha_output" not in r for r in logged["kd"])
    assert result.steps == 20
    params = {k: v.clone() for k, v in engine.engine.module.state_dict().items()}
    state = json.loads((out / "checkpoints" / "kdqat" / "step_00000020" / "kdqat_state.json").read_text())
    assert state["ti_convergence"]["ended"] == {"ti_output": 4, "ti_map": 8}

    # a restart from the checkpoint of step 10 (in KD-QAT, after both early ends) continues identically
    (out / "checkpoints" / "kdqat" / "latest").write_text("step_00000010")
    del engine
    engine, again = _kd_stage(config)
    assert again.steps == 20 and _log_rows(out) == rows
    resumed = engine.engine.module.state_dict()
    assert all(torch.equal(resumed[k], params[k]) for k in params)
