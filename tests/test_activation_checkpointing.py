"""Activation checkpointing of the student (``kdqat.train.activation_checkpointing``, issue 15 item 3).

Acceptance: with every encoder layer checkpointed, one KD-QAT micro step gives the same loss, the same logged
terms and the same gradient of every student parameter as without checkpointing, with dropout on, for the
TernaryBERT recipe (layer-output MSE + attention-score MSE), a map-KL recipe and the Teacher-Intervention phases
(TI-O, TI-M), on BERT and the other registered families. Tolerance: ``rtol=1e-6, atol=0`` per element (what is
observed is bit-for-bit equality: the recomputation replays the same arithmetic with the same dropout masks).
Also: taps are recorded once, the recomputation really runs, LAT's own gradient sink and LSQ's step gradient are
unchanged, no tap is kept alive for the recomputation, the gradient guard judges as without checkpointing,
checkpointing set up by hand is refused where it would be wrong, the config key is typed (ConfigError); under
DeepSpeed, ZeRO 0-3 on 2 ranks train bit for bit the same, and a short ``run/train.py`` job with the key on logs
the same losses (the estimator's arithmetic for checkpointing is in tests/test_estimate.py).

The quantized linears and the attention's matmuls save their fake-quantized operands as integer codes under
their own ``saved_tensors_hooks`` (:mod:`ds_kdqat.quant.codes`). PyTorch applies only the innermost hooks, so
inside a checkpointed layer those are switched off (checkpoint's hooks drop what the ops save): the runs without
checkpointing here save codes, the checkpointed ones do not inside their layers, and a test checks that no hooks
of their own are pushed there.
"""

from __future__ import annotations

import copy
import csv
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, DistilBertConfig,
                          DistilBertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification,
                          T5Config, ViTConfig, ViTForImageClassification)

from ds_kdqat.config import parse_config
from ds_kdqat.distill import DistillConfig, TeacherInterventionConfig, kd_forward, kd_phases
from ds_kdqat.distill.gradients import frozen_on_purpose, graph_check_possible, phase_gradient_report
from ds_kdqat.distill.schedule import build_interventions
from ds_kdqat.errors import ConfigError
from ds_kdqat.models.attention import self_attention_modules
from ds_kdqat.models.checkpointing import (checkpointing_replays_sessions, disable_activation_checkpointing,
                                           enable_activation_checkpointing, in_checkpointed_layer,
                                           layer_checkpointing)
from ds_kdqat.models.families import adapter_for
from ds_kdqat.models.families.t5 import KdqatT5EncoderForSequenceClassification
from ds_kdqat.models.taps import TAP_NAMES, forward_with_taps
from ds_kdqat.quant import quantize_model
from ds_kdqat.quant.modules import WeightQuantizer
from tests.tiny import REPO, make_task_dir, make_tiny_bert, run_train, train_env, write_config

RTOL, ATOL = 1e-6, 0.0
LAYERS = 2
TINY = dict(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=64, vocab_size=100,
            max_position_embeddings=64, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
FAMILIES = {  # tiny task models with dropout on (0.1 everywhere)
    "bert": lambda: BertForSequenceClassification(BertConfig(**TINY)),
    "roberta": lambda: RobertaForSequenceClassification(RobertaConfig(pad_token_id=1, **TINY)),
    "distilbert": lambda: DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=100, dim=32, n_layers=LAYERS, n_heads=2, hidden_dim=64, max_position_embeddings=64, dropout=0.1,
        attention_dropout=0.1)),
    "t5": lambda: KdqatT5EncoderForSequenceClassification(T5Config(
        vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=LAYERS, num_heads=2, dropout_rate=0.1)),
    "vit": lambda: ViTForImageClassification(ViTConfig(
        hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=64, image_size=8,
        patch_size=4, num_channels=3, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)),
}


def batch_for(model) -> dict[str, torch.Tensor]:
    adapter = adapter_for(model)
    labels = torch.tensor([0, 1, 1])
    if adapter.input_kind == "pixels":
        return {"pixel_values": torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(3)), "labels": labels}
    ids = torch.tensor([[3, 15, 27, 9, 44, 4], [3, 11, 52, 4, 0, 0], [3, 8, 90, 61, 33, 4]])
    mask = (torch.arange(6)[None] < torch.tensor([[6], [4], [6]])).long()
    batch = {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}
    if adapter.token_type_ids:
        batch["token_type_ids"] = torch.zeros_like(ids)
    return batch


def models(family="bert", quant=None):
    """(teacher in eval mode, quantized student in training mode: dropout on)."""
    torch.manual_seed(0)
    teacher = FAMILIES[family]().eval()
    student = copy.deepcopy(teacher)
    quantize_model(student, quant or {"preset": "ternarybert"})
    return teacher, student.train()


def phases_of(recipe, kd_recipe="ternarybert"):
    config = DistillConfig(recipe=recipe, ti=TeacherInterventionConfig(kd_recipe=kd_recipe))
    return {phase.name: phase for phase in kd_phases(config, 12, LAYERS, "classification")[0]}


def step(teacher, student, batch, phase, checkpointing, teacher_context=torch.no_grad):
    """One micro step on a copy of ``student``: (loss, terms, {parameter: grad}, the copy)."""
    student = copy.deepcopy(student)
    if checkpointing:
        assert enable_activation_checkpointing(student) == LAYERS
    torch.manual_seed(1234)  # the same dropout masks in both runs
    loss, terms = kd_forward(teacher, student, batch, phase, teacher_context=teacher_context)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in student.named_parameters() if p.grad is not None}
    return loss.detach(), terms, grads, student


def assert_same_step(teacher, student, batch, phase, **kwargs):
    loss0, terms0, grads0, _ = step(teacher, student, batch, phase, False, **kwargs)
    loss1, terms1, grads1, copy1 = step(teacher, student, batch, phase, True, **kwargs)
    torch.testing.assert_close(loss1, loss0, rtol=RTOL, atol=ATOL)
    assert terms1.keys() == terms0.keys()
    for name in terms0:
        torch.testing.assert_close(terms1[name], terms0[name], rtol=RTOL, atol=ATOL, msg=name)
    # every parameter gets a gradient in both runs (but TI-M's map quantizers: frozen on purpose)
    trainable = {name for name, p in student.named_parameters() if p.requires_grad}
    assert grads0.keys() == grads1.keys() == trainable - set(frozen_on_purpose(phase, student))
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=RTOL, atol=ATOL, msg=name)
    return copy1


@pytest.mark.parametrize("recipe, phase", [("ternarybert", "kd"), ("map", "kd"), ("ti_output", "ti_output"),
                                           ("ti_map", "ti_map")])
def test_bert_step_is_the_same_with_checkpointing(recipe, phase):
    teacher, student = models()
    assert_same_step(teacher, student, batch_for(student), phases_of(recipe)[phase])


@pytest.mark.parametrize("family", ["roberta", "distilbert", "t5", "vit"])
def test_other_families_ternarybert_and_ti_map(family):
    teacher, student = models(family)
    phases = phases_of("ti_map")
    for name in ("ti_map", "kd"):
        assert_same_step(teacher, student, batch_for(student), phases[name])


def test_ti_output_with_an_inference_mode_teacher():
    teacher, student = models()
    assert_same_step(teacher, student, batch_for(student), phases_of("ti_output", "map")["ti_output"],
                     teacher_context=torch.inference_mode)


@pytest.mark.parametrize("quant", [
    {"preset": "ternarybert_lsq"},  # LSQ: learned steps, and a shared Q/K/V quantizer that remembers its input
    {"preset": "ternarybert_lat", "lat": {"second_moment": "own"}},  # LAT collecting its own gradient
])
def test_lsq_and_lat_own_gradient(quant):
    teacher, student = models(quant=quant)
    phase = phases_of("ti_map", "map")["ti_map"]
    _, _, _, plain = step(teacher, student, batch_for(student), phase, False)
    checkpointed = assert_same_step(teacher, student, batch_for(student), phase)
    sinks = [(m, n) for m, n in zip(plain.modules(), checkpointed.modules()) if isinstance(m, WeightQuantizer)]
    collected = [(m.grad_accum, n.grad_accum) for m, n in sinks if m.grad_accum is not None]
    assert len(collected) == (6 * LAYERS + 1 if quant["preset"] == "ternarybert_lat" else 0)
    for own, with_checkpointing in collected:  # the backward-side sink is filled once, as without checkpointing
        torch.testing.assert_close(with_checkpointing, own, rtol=RTOL, atol=ATOL)


def test_taps_are_recorded_once_and_the_layers_are_recomputed():
    teacher, student = models()
    enable_activation_checkpointing(student)
    runs = []
    for module in self_attention_modules(student):
        module.register_forward_hook(lambda *args: runs.append(in_checkpointed_layer()))
    torch.manual_seed(0)
    inputs = {k: v for k, v in batch_for(student).items() if k != "labels"}
    taps = forward_with_taps(student, inputs, TAP_NAMES)
    recorded = {name: [id(t) for t in getattr(taps, name)] for name in TAP_NAMES - {"embedding_output"}}
    assert len(runs) == LAYERS
    loss = sum(t.float().clamp(min=-1e4).square().mean() for name in ("attention_scores", "attention_maps",
                                                                      "contexts", "mha_outputs", "attention_outputs",
                                                                      "layer_outputs")
               for t in getattr(taps, name)) + taps.logits.sum()
    loss.backward()
    assert runs == [True] * (2 * LAYERS)  # each layer recomputed once in the backward; both runs flagged
    assert not in_checkpointed_layer()
    assert {name: [id(t) for t in getattr(taps, name)] for name in recorded} == recorded  # nothing recorded again
    assert all(p.grad is not None for p in student.parameters())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_recomputation_keeps_no_tap_alive(checkpointing):
    """What a recomputation needs (the interventions) is all the checkpointed layers hold of the tap session: a tap
    the losses do not keep is freed when the taps are dropped, before the backward, as without checkpointing."""
    import gc
    import weakref

    teacher, student = models()
    if checkpointing:
        enable_activation_checkpointing(student)
    inputs = {k: v for k, v in batch_for(student).items() if k != "labels"}
    with torch.no_grad():
        interventions = build_interventions("ti_output", forward_with_taps(teacher, inputs, {"mha_outputs"}))
    taps = forward_with_taps(student, inputs, {"mha_outputs"}, interventions)
    loss = taps.logits.sum()
    recorded = weakref.ref(taps.mha_outputs[0])  # replaced by the teacher's: nothing downstream saves it
    del taps
    gc.collect()
    assert recorded() is None
    loss.backward()


def test_a_session_without_replaying_is_replayed_by_a_view_that_records_nothing():
    """Any TapSession (the attention function's protocol) works under checkpointing: its replacements are handed
    again in the recomputation, its records are made once."""
    from ds_kdqat.models.attention import active_session

    teacher, student = models()
    inputs = {k: v for k, v in batch_for(student).items() if k != "labels"}
    with torch.no_grad():
        teacher_map = forward_with_taps(teacher, inputs, {"attention_maps"}).attention_maps[1]

    class Session:  # record and replacement only
        def __init__(self):
            self.records = []

        def record(self, layer, name, tensor):
            self.records.append((layer, name))

        def replacement(self, layer, name):
            return teacher_map if (layer, name) == (1, "attention_map") else None

    grads = []
    for checkpointing in (False, True):
        model = copy.deepcopy(student)
        if checkpointing:
            enable_activation_checkpointing(model)
        session = Session()
        torch.manual_seed(3)
        with active_session(session):
            logits = model(**inputs).logits
        logits.square().sum().backward()
        assert sorted(session.records) == sorted((l, n) for l in range(LAYERS)
                                                 for n in ("attention_score", "attention_map", "context"))
        grads.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=RTOL, atol=ATOL, msg=name)


def test_no_saved_tensor_hooks_of_its_own_inside_a_checkpointed_layer(monkeypatch):
    """PyTorch applies only the innermost saved-tensor hooks: hooks pushed inside a checkpointed layer (the quantized
    ops' integer codes) would keep what checkpointing drops. None is pushed there, in the forward or the
    recomputation; without checkpointing the quantized ops do push theirs."""
    teacher, student = models()
    phase = phases_of("ti_map")["ti_map"]
    pushes = []
    push = torch._C._autograd._push_saved_tensors_default_hooks

    def counting(pack, unpack):
        pushes.append(in_checkpointed_layer())
        return push(pack, unpack)

    monkeypatch.setattr(torch._C._autograd, "_push_saved_tensors_default_hooks", counting)
    step(teacher, student, batch_for(student), phase, False)
    without = len(pushes)
    pushes.clear()
    step(teacher, student, batch_for(student), phase, True)
    assert pushes and not any(pushes)  # checkpoint's own hooks only, outside the layer's context
    if not without:
        pytest.skip("the quantized ops push no saved-tensor hooks of their own")


def test_the_gradient_guard_judges_as_without_checkpointing():
    teacher, student = models()
    phase = phases_of("ti_map")["ti_map"]
    reports = []
    for checkpointing in (False, True):
        model = copy.deepcopy(student)
        if checkpointing:
            enable_activation_checkpointing(model)
        assert graph_check_possible(model) is None
        loss, _ = kd_forward(teacher, model, batch_for(model), phase)
        reports.append(phase_gradient_report(loss, model, phase))
        loss.backward()  # the walk recomputed nothing and freed nothing: the backward still works
    assert reports[0] == reports[1]


def test_checkpointing_set_up_by_hand_is_refused_where_it_would_be_wrong():
    teacher, student = models()
    batch = {k: v for k, v in batch_for(student).items() if k != "labels"}
    with torch.no_grad():
        teacher_taps = forward_with_taps(teacher, batch, {"attention_maps"})
    interventions = build_interventions("ti_map", teacher_taps)
    # HF's own (non-reentrant, but the recomputation would not see the teacher's tensors)
    student.activation_checkpointing_enable()
    assert layer_checkpointing(student) is not None and not checkpointing_replays_sessions(student)
    with pytest.raises(ValueError, match="interventions cannot be combined"):
        forward_with_taps(student, batch, {"attention_maps"}, interventions)
    forward_with_taps(student, batch, {"attention_maps"})  # taps without interventions are right
    # reentrant: the layers run without autograd, taps inside them would get no gradient
    student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    assert graph_check_possible(student) is not None
    with pytest.raises(ValueError, match="reentrant"):
        forward_with_taps(student, batch, {"attention_scores"})
    forward_with_taps(student, batch, {"layer_outputs"})  # outside the checkpointed forwards: right
    # ours, then off again
    enable_activation_checkpointing(student)
    assert checkpointing_replays_sessions(student)
    forward_with_taps(student, batch, {"attention_maps"}, interventions)
    disable_activation_checkpointing(student)
    assert layer_checkpointing(student) is None


def test_a_model_without_checkpointable_layers_is_refused():
    _, student = models()
    student.bert.encoder.layer[0].__class__ = torch.nn.Module  # no longer a GradientCheckpointingLayer
    with pytest.raises(ValueError, match="do not support activation checkpointing"):
        enable_activation_checkpointing(student)


BASE = {"train_micro_batch_size_per_gpu": 2}


def test_config_key_defaults_off_and_is_typed():
    run = parse_config(dict(BASE))
    assert run.kdqat.train.activation_checkpointing is False and run.kdqat.finetune.activation_checkpointing is False
    run = parse_config(dict(BASE), ["kdqat.train.activation_checkpointing=true"])
    assert run.kdqat.train.activation_checkpointing is True
    for section, value in (("train", "yes"), ("finetune", 1)):
        with pytest.raises(ConfigError) as caught:
            parse_config({**BASE, "kdqat": {section: {"activation_checkpointing": value}}})
        assert caught.value.path == f"kdqat.{section}.activation_checkpointing"


def test_the_engine_names_the_key_when_the_model_cannot_be_checkpointed(monkeypatch):
    import ds_kdqat.engine as engine

    def refuse(model):
        raise ValueError("its layers do not support activation checkpointing")

    monkeypatch.setattr(engine, "enable_activation_checkpointing", refuse)
    with pytest.raises(ConfigError) as caught:
        engine._enable_checkpointing(torch.nn.Linear(1, 1), "kdqat.train")
    assert caught.value.path == "kdqat.train.activation_checkpointing"


def test_switching_it_is_no_change_of_the_run():
    """The same training bit for bit: a run that ran out of memory may resume with checkpointing switched on."""
    from ds_kdqat.training.run_folder import fingerprint_changes, run_fingerprint

    off, on = (parse_config(dict(BASE), [f"kdqat.{s}.activation_checkpointing={v}" for s in ("train", "finetune")])
               for v in ("false", "true"))
    assert fingerprint_changes(run_fingerprint(off.to_json()), run_fingerprint(on.to_json())) == []


# -- under DeepSpeed: ZeRO 0-3 on 2 ranks, and a short run of the whole job ---------------------------------------

ZERO_SCRIPT = textwrap.dedent(r"""
    import copy, json, os, sys, torch, deepspeed
    import torch.distributed as dist
    from transformers import BertConfig, BertForSequenceClassification
    from ds_kdqat.distill import DistillConfig, TeacherInterventionConfig, kd_forward, kd_phases
    from ds_kdqat.models.checkpointing import enable_activation_checkpointing
    from ds_kdqat.quant import quantize_model

    stage = int(sys.argv[1])
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.1,
                        attention_probs_dropout_prob=0.1)
    teacher = BertForSequenceClassification(config).eval()
    quantized = copy.deepcopy(teacher)
    quantize_model(quantized, {"preset": "ternarybert"})
    phases = kd_phases(DistillConfig(recipe="ti_map", ti=TeacherInterventionConfig(kd_recipe="ternarybert")), 12,
                       2, "classification")[0]
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**6,
                 "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}
    generator = torch.Generator().manual_seed(5 + rank)
    batches = [{"input_ids": torch.randint(1, 64, (2, 8), generator=generator), "labels": torch.tensor([0, 1])}
               for _ in range(4)]
    runs = []
    for checkpointing in (False, True):
        student = copy.deepcopy(quantized).train()
        if checkpointing:
            enable_activation_checkpointing(student)
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
        engine, *_ = deepspeed.initialize(model=student, optimizer=optimizer, config=ds_config)
        torch.manual_seed(11 + rank)
        losses = []
        for i, batch in enumerate(batches):  # 2 steps of TI-M, then 2 of KD
            loss, _ = kd_forward(teacher, engine, batch, phases[0] if i < 2 else phases[-1])
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
            weights = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        runs.append((losses, weights))
    (l0, w0), (l1, w1) = runs
    if stage == 3:
        assert engine.module.bert.encoder.layer[0].attention.self.query.weight.numel() == 0  # really partitioned
    with open(f"result{rank}.json", "w") as handle:
        json.dump({"rank": rank, "losses": [l0, l1], "parameters": len(w0),
                   "different": [n for n in w0 if not torch.equal(w0[n], w1[n])]}, handle)
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # the results are written: skip the interpreter's teardown, where gloo may abort once the peer is gone
""")


def _zero_stage_runs(tmp_path, stage):
    script = tmp_path / "zero.py"
    script.write_text(ZERO_SCRIPT)
    env = dict(train_env(), PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               str(stage)]
    proc = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    files = sorted(tmp_path.glob("result*.json"))
    assert proc.returncode == 0 and len(files) == 2, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads(path.read_text()) for path in files]


@pytest.mark.parametrize("stage", [0, 3, pytest.param(1, marks=pytest.mark.slow),
                                   pytest.param(2, marks=pytest.mark.slow)])
def test_zero_stages_train_the_same_with_checkpointing(tmp_path, stage):
    """2 ranks, 4 optimizer steps (TI-M then KD, dropout on): per-rank losses and the final (gathered) weights are
    bit for bit those without checkpointing."""
    for result in _zero_stage_runs(tmp_path, stage):
        without, with_checkpointing = result["losses"]
        assert with_checkpointing == without, result
        assert result["parameters"] > 0 and result["different"] == [], result


def test_a_short_job_with_the_key_on_logs_the_same_losses(tmp_path):
    """``run/train.py`` with ``kdqat.finetune``/``kdqat.train.activation_checkpointing`` on (teacher fine-tuning,
    a TI-O phase then KD): the logged losses and metrics equal those of the same job with the key off."""
    model, data = make_tiny_bert(tmp_path / "bert"), make_task_dir(tmp_path / "task")
    logs = {}
    for on in (False, True):
        config = write_config(
            tmp_path / f"c{on}.json", model, data, tmp_path / f"out{on}", distill={"recipe": "ti_output"},
            finetune={"epochs": 1, "learning_rate": 2e-3, "max_steps": 3, "activation_checkpointing": on},
            train={"epochs": 1, "learning_rate": 5e-4, "max_steps": 4, "activation_checkpointing": on})
        result = run_train(config)
        checkpointed = [line for line in result.stdout.splitlines() if "activation_checkpointing:" in line]
        assert len(checkpointed) == (2 if on else 0), result.stdout[-3000:]
        with open(tmp_path / f"out{on}" / "log.csv", newline="") as handle:
            logs[on] = [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]
    assert {row["phase"] for row in logs[True]} >= {"finetune:supervised", "kdqat:kd"}
    assert any(row["ti_mha_output"] for row in logs[True])  # the TI-O phase ran
    assert logs[True] == logs[False]
