"""Teacher intervention in the tapped forward: TI-M, TI-O and context replacement."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from ds_kdqat.distill.losses import attention_map_kl
from ds_kdqat.distill.schedule import build_interventions
from ds_kdqat.models.taps import TAP_NAMES, Interventions, forward_with_taps


def tiny(seed):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=40, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager")
    return BertForSequenceClassification(config)


def batch():
    ids = torch.tensor([[2, 5, 7, 9, 3], [2, 11, 3, 0, 0]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


class Round(nn.Module):
    """A stand-in activation quantizer (quarter steps, straight-through gradient): 'student V' is V̂."""

    def forward(self, x):
        return x + (torch.round(x * 4) / 4 - x).detach()


def teacher_taps(names=TAP_NAMES):
    teacher = tiny(1).eval()
    with torch.no_grad():
        return forward_with_taps(teacher, batch(), names)


def grad_norm(param):
    return 0.0 if param.grad is None else param.grad.abs().sum().item()


def test_ti_map_context_is_teacher_map_times_student_v():
    teacher = teacher_taps()
    student = tiny(0).train()
    for layer in student.bert.encoder.layer:
        layer.attention.self.kdqat_act_quant = nn.ModuleDict({"value": Round()})
    own = forward_with_taps(student, batch(), {"attention_maps"})
    interventions = build_interventions("ti_map", teacher)
    taps = forward_with_taps(student, batch(), TAP_NAMES, interventions)
    for l, layer in enumerate(student.bert.encoder.layer):
        x = taps.layer_outputs[l]
        v_hat = Round()(layer.attention.self.value(x).view(2, 5, 2, 8).transpose(1, 2))
        torch.testing.assert_close(taps.contexts[l], teacher.attention_maps[l] @ v_hat, atol=1e-6, rtol=0)
    # the recorded map is the student's own (layer 0 sees the same input with or without intervention)
    torch.testing.assert_close(taps.attention_maps[0], own.attention_maps[0])
    assert not torch.allclose(taps.attention_maps[0], teacher.attention_maps[0])

    taps.logits.sum().backward()
    attention = student.bert.encoder.layer[1].attention.self
    assert grad_norm(attention.query.weight) == 0 and grad_norm(attention.key.weight) == 0  # map is the teacher's
    assert grad_norm(attention.value.weight) > 0
    assert grad_norm(student.bert.encoder.layer[0].intermediate.dense.weight) > 0


def test_ti_map_student_map_still_trains_through_the_map_loss():
    teacher = teacher_taps()
    student = tiny(0).train()
    taps = forward_with_taps(student, batch(), {"attention_maps"}, build_interventions("ti_map", teacher))
    attention_map_kl(taps.attention_maps[1], teacher.attention_maps[1], taps.attention_mask).backward()
    assert grad_norm(student.bert.encoder.layer[1].attention.self.query.weight) > 0


def test_ti_output_replaces_mha_output_detached():
    teacher = teacher_taps()
    student = tiny(0).train()
    interventions = build_interventions("ti_output", teacher)
    mha_teacher = {l: t.clone().requires_grad_(True) for l, t in interventions.mha_outputs.items()}
    taps = forward_with_taps(student, batch(), TAP_NAMES, Interventions(mha_outputs=mha_teacher))
    for l, layer in enumerate(student.bert.encoder.layer):
        norm = layer.attention.output.LayerNorm
        expected = F.layer_norm(taps.layer_outputs[l] + teacher.mha_outputs[l], (16,), norm.weight, norm.bias,
                                norm.eps)
        torch.testing.assert_close(taps.attention_outputs[l], expected, atol=1e-6, rtol=0)
        # the recorded MHA output is the student's own: O(context)
        own = layer.attention.output.dense(taps.contexts[l].transpose(1, 2).reshape(2, 5, 16))
        torch.testing.assert_close(taps.mha_outputs[l], own, atol=1e-6, rtol=0)

    taps.logits.sum().backward()
    assert all(t.grad is None for t in mha_teacher.values())  # nothing flows back through the replacement
    for layer in student.bert.encoder.layer:
        mha = layer.attention
        for linear in (mha.self.query, mha.self.key, mha.self.value, mha.output.dense):
            assert grad_norm(linear.weight) == 0
        assert grad_norm(layer.intermediate.dense.weight) > 0 and grad_norm(layer.output.dense.weight) > 0
    assert grad_norm(student.bert.encoder.layer[0].attention.output.LayerNorm.weight) > 0


def test_context_replacement_and_layer_subset():
    student = tiny(0).eval()
    zeros = torch.zeros(2, 2, 5, 8)
    taps = forward_with_taps(student, batch(), {"mha_outputs", "contexts"}, Interventions(contexts={0: zeros}))
    bias = student.bert.encoder.layer[0].attention.output.dense.bias
    torch.testing.assert_close(taps.mha_outputs[0], bias.expand(2, 5, 16))  # O(0) = b_O
    assert taps.contexts[0].abs().sum() > 0  # the tap holds the student's own context
    teacher = teacher_taps({"attention_maps"})
    only_last = build_interventions("ti_map", teacher, layers=[1])
    assert set(only_last.attention_maps) == {1}


def test_bad_interventions():
    student = tiny(0)
    with pytest.raises(ValueError, match=r"intervention attention_map\[0\] has shape \(2, 2, 5, 4\)"):
        forward_with_taps(student, batch(), set(), Interventions(attention_maps={0: torch.zeros(2, 2, 5, 4)}))
    with pytest.raises(ValueError, match=r"intervention mha_output\[1\] has shape"):
        forward_with_taps(student, batch(), set(), Interventions(mha_outputs={1: torch.zeros(2, 5, 8)}))
    with pytest.raises(ValueError, match=r"mha_outputs\[5\]: the model has layers 0..1"):
        forward_with_taps(student, batch(), set(), Interventions(mha_outputs={5: torch.zeros(2, 5, 16)}))
    assert build_interventions("kd", teacher_taps({"attention_maps"})) is None


@pytest.mark.parametrize("recipe", ["ternarybert", "map", "output", "map_output", "ti_map", "ti_output"])
def test_teacher_under_inference_mode(recipe):
    from ds_kdqat.distill import DistillConfig, build_objective

    objective = build_objective(DistillConfig(recipe=recipe), num_layers=2)
    phase = {"ti_map": "ti_map", "ti_output": "ti_output"}.get(recipe, "kd")
    with torch.inference_mode():
        teacher = forward_with_taps(tiny(1).eval(), batch(), TAP_NAMES)
    student = tiny(0).train()  # no dropout: map·V would save the teacher's map itself
    taps = forward_with_taps(student, batch(), objective.required_taps, build_interventions(phase, teacher))
    loss, _ = objective(taps, teacher)
    loss.backward()
    assert torch.isfinite(loss) and grad_norm(student.bert.encoder.layer[1].output.dense.weight) > 0


def test_interventions_refuse_gradient_checkpointing():
    student = tiny(0).train()
    if hasattr(student, "activation_checkpointing_enable"):  # transformers >= 5 name
        student.activation_checkpointing_enable()
    else:
        student.gradient_checkpointing_enable()
    teacher = teacher_taps({"mha_outputs"})
    with pytest.raises(ValueError, match="gradient checkpointing"):
        forward_with_taps(student, batch(), set(), build_interventions("ti_output", teacher))
