"""The student in DeepSpeed's bf16 mode on the CPU (issue 15 item 4).

* the KD losses are computed in fp32 from bf16 taps, with the fp32 gradient, keeping no fp32 copies of the taps
  for the backward (``ds_kdqat.distill.precision``);
* a quantized model in bf16 computes in bf16 (the quantizers' outputs, every tap);
* a short KD-QAT run with ``"bf16": {"enabled": true}`` (DeepSpeed's engine, one rank in this process, the real
  stage: ``pipeline.train_student``) stays within a stated tolerance of the same run in fp32, at ZeRO-0 with LAT
  (whose second moment stays float32) and at ZeRO-3 with a partitioned bf16 teacher.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from ds_kdqat.distill import losses
from ds_kdqat.distill.precision import fp32_term
from ds_kdqat.models.taps import TAP_NAMES, forward_with_taps
from ds_kdqat.quant import quantize_model
from ds_kdqat.quant.lat import lat_quantizers
from ds_kdqat.quant.modules import QUANT_MODULE_TYPES, ActQuantizer, WeightQuantizer
from tests.tiny import make_task_dir, make_tiny_bert, tiny_batch, tiny_bert_classifier, write_config

# Per-step KD loss of the bf16 run against the fp32 run, relative. Step 1 runs the same weights, so only the forward
# is rounded (bf16 keeps 8 significant bits; the losses themselves are fp32): 0.5 % (measured 0.04 %). From then on
# DeepSpeed updates fp32 master weights but the model computes with their bf16 rounding, which moves the odd weight
# across a ternary threshold, and the runs drift apart: 3 % over 8 steps (measured: at most 1.3 %, at steps 6-7).
FIRST_STEP_TOLERANCE = 0.005
STEP_TOLERANCE = 0.03
STEPS = 8


# -- fp32 losses from bf16 taps -------------------------------------------------------------------------------

def test_fp32_term_is_the_float32_loss_and_gradient_and_keeps_only_the_taps():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    student = torch.softmax(torch.randn(2, 2, 4, 4), -1).bfloat16().requires_grad_(True)
    teacher = torch.softmax(torch.randn(2, 2, 4, 4), -1).bfloat16()

    def kl(s, t):
        return losses.attention_map_kl(s, t, mask)

    value = fp32_term(kl, student, teacher)
    assert value.dtype == torch.float32
    value.backward()
    ours = student.grad.clone()
    student.grad = None
    reference = kl(student.float(), teacher.float())  # the same loss, cast in the forward
    reference.backward()
    assert torch.equal(value.detach(), reference.detach())
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, student.grad)
    node = fp32_term(kl, student, teacher).grad_fn
    assert [t.data_ptr() for t in node.saved_tensors] == [student.data_ptr()]  # no fp32 copy kept
    # float32 taps take the direct path: the loss function itself, nothing wrapped
    plain = student.detach().float().requires_grad_(True)
    assert fp32_term(kl, plain, teacher).grad_fn.name() != node.name()


def test_a_quantized_model_in_bf16_computes_in_bf16():
    from ds_kdqat.quant import after_optimizer_step

    model = tiny_bert_classifier(seed=3)
    quantize_model(model, {"preset": "ternarybert_lat", "lat": {"second_moment": "own"}})
    model.to(torch.bfloat16).train()
    outputs: dict[str, torch.dtype] = {}

    def record(name):
        def hook(module, args, out):
            outputs[name] = out.dtype
        return hook

    for name, module in model.named_modules():
        if isinstance(module, (WeightQuantizer, ActQuantizer, *QUANT_MODULE_TYPES)):
            module.register_forward_hook(record(name))
    taps = forward_with_taps(model, tiny_batch(), TAP_NAMES)
    quantized = {name for name, m in model.named_modules() if isinstance(m, QUANT_MODULE_TYPES)}
    assert len(quantized) == 13 and quantized <= set(outputs), sorted(outputs)  # every quantized module ran
    assert set(outputs.values()) == {torch.bfloat16}, outputs  # (and any quantizer called as a module)
    dtypes = {t.dtype for name in TAP_NAMES - {"embedding_output"} for t in getattr(taps, name)}
    assert dtypes == {torch.bfloat16} and taps.logits.dtype == torch.bfloat16
    # LAT's own second moment, folded from the bf16 gradient, is float32 (the optimizer's is tested below)
    taps.logits.float().square().sum().backward()
    assert after_optimizer_step(model) == 13
    assert {q.second_moment.dtype for _, q in lat_quantizers(model)} == {torch.float32}
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    for name, module in model.named_modules():  # the fake-quantized weights and activations themselves
        if isinstance(module, WeightQuantizer):
            assert module(torch.randn(64, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16, name
        elif isinstance(module, ActQuantizer):
            assert module(x).dtype == torch.bfloat16, name


# -- DeepSpeed bf16: a short run against fp32 -------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_rank():
    from tests.tiny import offline_one_rank_group

    with offline_one_rank_group():
        yield


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny BERT without dropout (so both runs see the same computation) and the tiny task."""
    root = tmp_path_factory.mktemp("assets")
    bert = make_tiny_bert(root / "bert")
    config = json.loads((bert / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (bert / "config.json").write_text(json.dumps(config))
    return bert, make_task_dir(root / "task", n_train=64)


def kd_run(root: Path, assets, deepspeed: dict, **model):
    """The KD-QAT stage of ``STEPS`` steps (LAT preset) in this process: (engine, per-step KD losses)."""
    from ds_kdqat import pipeline
    from ds_kdqat.config import load_config

    bert, task = assets
    config = write_config(root / "c.json", bert, task, root / "out",
                          model={"teacher": str(bert), "teacher_finetune": "never", "local_files_only": True, **model},
                          quant={"preset": "ternarybert_lat"},
                          train={"epochs": 1, "learning_rate": 1e-4, "max_steps": STEPS},
                          logging={"log_every": 1, "save_every": 100, "progress": False})
    config.write_text(json.dumps({**json.loads(config.read_text()), **deepspeed}))
    ctx = pipeline.prepare(load_config(str(config)))
    try:
        engine, _ = pipeline.train_student(ctx, pipeline.finetune_teacher(ctx))
    finally:
        ctx.release()
    with open(root / "out" / "log.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["split"] == "train" and r["phase"] == "kdqat:kd"]
    return engine, [float(r["total"]) for r in rows]


@pytest.fixture(scope="module")
def fp32_losses(one_rank, assets, tmp_path_factory):
    return kd_run(tmp_path_factory.mktemp("fp32"), assets, {})[1]


def assert_close_to_fp32(bf16: list, fp32: list) -> list:
    differences = [abs(a - b) / abs(b) for a, b in zip(bf16, fp32)]
    assert len(bf16) == len(fp32) == STEPS, (bf16, fp32)
    assert differences[0] <= FIRST_STEP_TOLERANCE and max(differences) <= STEP_TOLERANCE, (bf16, fp32)
    return differences


def test_bf16_run_with_lat_stays_close_to_fp32(fp32_losses, assets, tmp_path):
    engine, bf16 = kd_run(tmp_path, assets, {"bf16": {"enabled": True}})
    assert_close_to_fp32(bf16, fp32_losses)
    student = engine.engine.module
    assert {p.dtype for p in student.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in engine.teacher.parameters()} == {torch.float32}  # teacher_precision "fp32"
    quantizers = [q for _, q in lat_quantizers(student)]
    assert len(quantizers) == 13  # 12 linears + the word embedding
    # LAT's D comes from the optimizer's fp32 second moment (DeepSpeed's bf16 optimizer keeps fp32 state)
    assert {q.moment_source for q in quantizers} == {"optimizer"}
    assert {q.second_moment.dtype for q in quantizers} == {torch.float32}


def test_bf16_zero3_with_a_partitioned_bf16_teacher_stays_close_to_fp32(fp32_losses, assets, tmp_path):
    engine, bf16 = kd_run(tmp_path, assets, {"bf16": {"enabled": True}, "zero_optimization": {"stage": 3}},
                          teacher_precision="bf16")
    assert_close_to_fp32(bf16, fp32_losses)
    assert engine.teacher_partitioned
    assert {p.dtype for p in engine.teacher.module.parameters()} == {torch.bfloat16}
    assert {q.second_moment.dtype for _, q in lat_quantizers(engine.engine.module)} == {torch.float32}
