"""LSQ activations (learned step size, Esser et al. 2020): hand-computed forward and gradients, first-batch
initialisation, config, two training steps that move s, saved-student files and packed export."""

import json
import math

import pytest
import torch
from transformers import BertForSequenceClassification

from tests.tiny import tiny_batch, tiny_bert_classifier
from ds_kdqat.errors import ConfigError
from ds_kdqat.quant import (
    ActQuantizer,
    QuantConfig,
    export_packed,
    load_packed,
    lsq_quantize,
    quant_config_from_dict,
    quantize_model,
)
from ds_kdqat.quant.functional import lsq_parts, lsq_range
from ds_kdqat.quant.methods import QUANT_METHODS

X = torch.tensor([0.3, -1.1, 2.5, -5.0, 0.05])


def test_range_and_forward_hand_computed():
    assert lsq_range(3) == (4, 3) and lsq_range(8) == (128, 127)
    # s = 0.5: x/s = [0.6, -2.2, 5, -10, 0.1] → clamp to [-4, 3] → round → [1, -2, 3, -4, 0]
    out = lsq_quantize(X, torch.tensor(0.5), bits=3)
    assert out.tolist() == [0.5, -1.0, 1.5, -2.0, 0.0]
    parts = lsq_parts(X, torch.tensor(0.5), 3)
    assert parts.kind == "lsq" and parts.codes.tolist() == [1, -2, 3, -4, 0]
    assert torch.equal(QUANT_METHODS["lsq"].dequantize(parts), out)


def test_gradients_hand_computed():
    x = X.clone().requires_grad_()
    s = torch.tensor(0.5, requires_grad=True)
    lsq_quantize(x, s, bits=3).backward(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    # ∂x̂/∂x: 1 inside (−4 < x/s < 3), 0 for the clamped 2.5 and -5.0
    assert x.grad.tolist() == [1.0, 2.0, 0.0, 0.0, 5.0]
    # ∂x̂/∂s: round(v) − v inside = [0.4, 0.2, ·, ·, −0.1]; Q_P = 3 above, −Q_N = −4 below
    # Σ g·∂x̂/∂s = 0.4 + 0.4 + 9 − 16 − 0.5 = −6.7, times g = 1/√(N·Q_P) = 1/√15
    assert s.grad.item() == pytest.approx(-6.7 / math.sqrt(15), rel=1e-5)
    s.grad = None
    lsq_quantize(X, s, bits=3, grad_scale=1.0).backward(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert s.grad.item() == pytest.approx(-6.7, rel=1e-5)


def test_act_quantizer_initialises_the_step_on_the_first_batch():
    aq = ActQuantizer(3, "symmetric", method="lsq")
    assert aq.describe() == "A3 LSQ" and aq.method == "lsq"
    assert sorted(aq.state_dict()) == ["step_delta", "step_init"] and aq.step_delta.shape == (1,)
    assert [n for n, _ in aq.named_parameters()] == ["step_delta"]
    x = X.clone().requires_grad_()
    out = aq(x)
    s0 = 2 * 1.79 / math.sqrt(3)  # 2·mean|x|/√Q_P, mean|x| = 8.95/5
    assert aq.step_init.item() == pytest.approx(s0, rel=1e-6) and aq.step_delta.item() == 0.0
    # x/s0 = [0.145, -0.532, 1.209, -2.419, 0.024] → codes [0, -1, 1, -2, 0]
    torch.testing.assert_close(out, torch.tensor([0.0, -1.0, 1.0, -2.0, 0.0]) * s0)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    out.backward(g)
    v = X / s0
    expected = (g * (v.round() - v)).sum() / math.sqrt(5 * 3)  # all inside the range
    assert aq.step_delta.grad.item() == pytest.approx(expected.item(), rel=1e-4)
    aq(X * 10)  # later batches do not re-initialise
    assert aq.step_init.item() == pytest.approx(s0, rel=1e-6)


@pytest.mark.parametrize("group, path, fragment", [
    ({"act_method": "lsq"}, "groups[0].act_mode", 'method "lsq" supports "symmetric"'),
    ({"act_method": "lsq", "act_mode": "symmetric", "act_clip": 2.0}, "groups[0].act_clip", "takes no clip"),
    ({"act_method": "lsq", "act_mode": "symmetric", "act_bits": 1}, "groups[0].act_bits", "2..16"),
    ({"act_method": "twn"}, "groups[0].act_method", 'allowed: "uniform", "lsq"'),
    ({"method": "lsq"}, "groups[0].method", 'allowed: "twn", "lat", "binary", "uniform"'),
])
def test_config_errors(group, path, fragment):
    with pytest.raises(ConfigError) as err:
        quant_config_from_dict({"groups": [{"patterns": ["query$"], **group}]})
    assert err.value.path == f"kdqat.quant.{path}" and fragment in err.value.message


def test_config_attention_and_accepted_forms():
    with pytest.raises(ConfigError, match=r"^kdqat\.quant\.attention\.mode: .*\"lsq\" supports \"symmetric\""):
        quant_config_from_dict({"attention": {"method": "lsq"}})
    config = quant_config_from_dict({"groups": [{"patterns": ["query$"], "act_method": "lsq", "act_mode": "symmetric"}],
                                     "attention": {"method": "lsq", "mode": "symmetric", "bits": 4}})
    assert config.groups[0].act_method == "lsq" and config.attention.method == "lsq"


def lsq_quantizers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, ActQuantizer)}


def trained_lsq_student():
    model = tiny_bert_classifier()
    report = quantize_model(model, QuantConfig(preset="ternarybert_lsq"))
    assert all(e.activation == "A8 LSQ" for e in report.of_kind("linear") + report.of_kind("attention"))
    quantizers = lsq_quantizers(model)
    # per layer: Q/K/V input (shared), O input, FFN1 and FFN2 inputs, and 4 attention points
    assert len(quantizers) == 2 * (4 + 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    steps = []
    for _ in range(2):
        loss = model(**tiny_batch()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        steps.append({n: QUANT_METHODS["lsq"].step(q).item() for n, q in quantizers.items()})
    return model, quantizers, steps


def test_two_training_steps_move_the_learned_steps():
    model, quantizers, steps = trained_lsq_student()
    for name, q in quantizers.items():
        assert q.step_init.item() > 0, name  # initialised on the first batch
        assert q.step_delta.item() != 0, name  # learned
        assert steps[0][name] != steps[1][name], name  # and it moves with every step


def test_saved_student_files_restore_the_learned_steps(tmp_path):
    from ds_kdqat.quant.student_files import ACT_STATE_FILE, quantize_saved_student, write_student_files

    model, _, _ = trained_lsq_student()
    model.eval()
    with torch.no_grad():
        expected = model(**tiny_batch()).logits
    # as the pipeline saves a student (ds_kdqat.pipeline.save_hf): a copied state dict, so the shared Q/K/V
    # input quantizer's tensors (one per registered name) are separate tensors for safetensors
    model.save_pretrained(tmp_path, state_dict={k: v.detach().clone() for k, v in model.state_dict().items()})
    write_student_files(model, str(tmp_path), QuantConfig(preset="ternarybert_lsq"))
    assert (tmp_path / ACT_STATE_FILE).exists()
    fresh = BertForSequenceClassification.from_pretrained(tmp_path).eval()
    quantize_saved_student(fresh, str(tmp_path))
    for name, q in lsq_quantizers(fresh).items():
        assert torch.equal(q.step_delta, lsq_quantizers(model)[name].step_delta), name
    with torch.no_grad():
        assert torch.equal(fresh(**tiny_batch()).logits, expected)


def test_packed_export_carries_the_learned_steps(tmp_path):
    model, quantizers, _ = trained_lsq_student()
    model.eval()
    with torch.no_grad():
        expected = model(**tiny_batch()).logits
    export_packed(model, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "weights.safetensors"))
    name = "bert.encoder.layer.0.attention.self.query.act_quant"
    assert manifest["activations"][name] == {"method": "lsq", "bits": 8, "mode": "symmetric", "tensors": ["step"]}
    assert tensors[f"{name}.step"].item() == QUANT_METHODS["lsq"].step(quantizers[name]).item()
    assert not any(k.endswith(("step_init", "step_delta")) for k in tensors)
    loaded = load_packed(tmp_path, tiny_bert_classifier).eval()
    for n, q in lsq_quantizers(loaded).items():
        assert QUANT_METHODS["lsq"].step(q).item() == QUANT_METHODS["lsq"].step(quantizers[n]).item(), n
    with torch.no_grad():
        assert torch.equal(loaded(**tiny_batch()).logits, expected)
