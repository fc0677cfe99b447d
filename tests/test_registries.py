"""The registries are the single source: a loss term or a quantization method registered here, in the test,
is accepted by the config, used by the objective / quantizer modules and export, and trains."""

import copy
import sys
import textwrap

import pytest
import torch

from tests.tiny import tiny_batch, tiny_bert_classifier
from ds_kdqat.config import parse_config
from ds_kdqat.distill import TERMS, build_objective, describe_terms, register_term
from ds_kdqat.distill.config import DistillConfig
from ds_kdqat.distill.recipes import RECIPES
from ds_kdqat.errors import ConfigError
from ds_kdqat.models.taps import forward_with_taps
from ds_kdqat.quant import QUANT_METHODS, export_packed, load_packed, quantize_model, quantized_weights
from ds_kdqat.quant.functional import QuantParts, _mean, _reduce_dims, _sum
from ds_kdqat.quant.methods import TernaryMethod, TwnMethod, method_for_kind, register_method


def run_config(distill: dict) -> dict:
    return {"train_micro_batch_size_per_gpu": 2,
            "kdqat": {"output_dir": "unused", "model": {"teacher": "unused"}, "distill": distill}}


@pytest.fixture
def hidden_l1():
    """A toy term registered for the test only: mean absolute error of the layer outputs over real tokens."""

    @register_term("hidden_l1", tap="layer_outputs", per_layer=True, layer_offset=1,
                   padding="mean over the elements of real tokens")
    def hidden_l1_loss(student, teacher, ctx):
        """L1 of layer outputs."""
        mask = ctx.attention_mask.to(student.dtype)[..., None]
        return ((student - teacher).abs() * mask).sum() / (mask.sum() * student.shape[-1])

    yield TERMS["hidden_l1"]
    del TERMS["hidden_l1"]


def test_a_term_registered_in_a_test_is_configured_and_trains(hidden_l1):
    assert "hidden_l1" in describe_terms() and "L1 of layer outputs" in describe_terms()
    # selected through the run config's kdqat.distill section; errors name the key path
    distill = {"recipe": "custom", "terms": ["pred", "hidden_l1"], "weights": {"hidden_l1": 2.0},
               "layers": {"mode": "list", "indices": [-1], "include_embedding": False}}
    config = parse_config(run_config(distill)).kdqat.distill
    assert config.weights.hidden_l1 == 2.0 and config.weights["pred"] == 1.0
    with pytest.raises(ConfigError) as err:
        parse_config(run_config({**distill, "weights": {"hidden_l2": 1.0}}))
    assert err.value.path == "kdqat.distill.weights.hidden_l2" and "hidden_l1" in err.value.message
    with pytest.raises(ConfigError) as err:
        parse_config(run_config({**distill, "terms": ["hidden_l2"]}))
    assert err.value.path == "kdqat.distill.terms[0]" and '"hidden_l1"' in err.value.message

    teacher, student = tiny_bert_classifier(0).eval(), tiny_bert_classifier(1)
    quantize_model(student)
    objective = build_objective(config, num_layers=2)
    assert objective.coefficients == {"pred": 1.0, "hidden_l1": 2.0}
    assert objective.required_taps == {"layer_outputs"} and objective.record_layers == (1,)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    student.train()
    logged = []
    for _ in range(2):
        with torch.no_grad():
            t = forward_with_taps(teacher, tiny_batch(), objective.required_taps, layers=objective.record_layers)
        s = forward_with_taps(student, tiny_batch(), objective.required_taps, layers=objective.record_layers)
        loss, terms = objective(s, t, tiny_batch()["labels"])
        expected = hidden_l1.loss(s.layer_outputs[2], t.layer_outputs[2], objective_context(s))
        torch.testing.assert_close(terms["hidden_l1"], expected.detach())
        torch.testing.assert_close(terms["total"], terms["pred"] + 2.0 * terms["hidden_l1"])
        optimizer.zero_grad()
        loss.backward()
        logged.append({k: float(v) for k, v in terms.items()})
        optimizer.step()
    assert logged[0]["hidden_l1"] > 0 and logged[0]["hidden_l1"] != logged[1]["hidden_l1"]
    # the toy term alone sends a gradient into the (quantized) encoder
    alone = build_objective(DistillConfig(recipe="custom", terms=["hidden_l1"]), num_layers=2)
    student.zero_grad()
    with torch.no_grad():
        t = forward_with_taps(teacher, tiny_batch(), alone.required_taps, layers=alone.record_layers)
    alone(forward_with_taps(student, tiny_batch(), alone.required_taps, layers=alone.record_layers), t)[0].backward()
    grad = student.bert.encoder.layer[0].attention.self.query.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def objective_context(taps):
    from ds_kdqat.distill.terms import TermContext

    return TermContext(taps.attention_mask, None, "classification", 1.0, 1.0)


def test_a_terms_module_is_picked_up(tmp_path, monkeypatch):
    import ds_kdqat.distill as distill
    from ds_kdqat.distill import terms

    (tmp_path / "terms_toy_zero.py").write_text(textwrap.dedent("""
        from ds_kdqat.distill.terms import register_term

        @register_term("toy_zero", tap="logits", padding="none")
        def toy_zero(student, teacher, ctx):
            \"\"\"Always zero.\"\"\"
            return (student - student).sum()
    """))
    monkeypatch.setattr(distill, "__path__", [*distill.__path__, str(tmp_path)])
    try:
        terms._import_term_modules()
        assert TERMS["toy_zero"].summary == "Always zero."
        DistillConfig(recipe="custom", terms=["toy_zero"]).validate()
    finally:
        TERMS.pop("toy_zero", None)
        sys.modules.pop("ds_kdqat.distill.terms_toy_zero", None)


def test_recipes_and_config_read_the_registries():
    assert DistillConfig().weights == {name: term.default_weight for name, term in TERMS.items()}
    with pytest.raises(ConfigError, match=r'^distill\.recipe: got "tinybert"; allowed: "ternarybert", "map"'):
        DistillConfig(recipe="tinybert").validate()
    assert {name for name, r in RECIPES.items() if r.teacher_intervention} == {"ti_map", "ti_output", "ti_gradual"}
    assert DistillConfig(recipe="ti_map").is_teacher_intervention and not DistillConfig().is_teacher_intervention


@pytest.fixture
def half_ternary():
    """A toy weight method registered for the test only: ternary with threshold 0.5·mean|w|."""

    @register_method("half_ternary")
    class HalfTernary(TernaryMethod):  # bits, kind and packed codes: the ternary base's
        label = "HALF"

        def parts(self, x, owner=None):
            w = x.detach()
            dims = _reduce_dims(w, self.granularity)
            support = (w.abs() > 0.5 * _mean(w.abs(), dims)).to(w.dtype)
            alpha = _sum(w.abs() * support, dims) / _sum(support, dims).clamp_min(1)
            return QuantParts("ternary", torch.sign(w) * support, alpha, bits=2)

    yield HalfTernary
    del QUANT_METHODS["half_ternary"]


def test_a_method_registered_in_a_test_is_configured_quantizes_and_exports(half_ternary, tmp_path):
    assert method_for_kind("ternary") is TwnMethod  # the first registered method of a kind decodes it
    config = {"groups": [{"patterns": [r"attention\.self\.(query|key)$"], "method": "half_ternary"}]}
    model = tiny_bert_classifier(0).eval()
    report = quantize_model(model, config)
    assert {e.quantizer for e in report.of_kind("linear")} == {"HALF 2-bit layer-wise"}
    w = model.bert.encoder.layer[0].attention.self.query.weight.detach()
    kept = w.abs() > 0.5 * w.abs().mean()
    q = quantized_weights(model)["bert.encoder.layer.0.attention.self.query.weight"]
    torch.testing.assert_close(q, torch.sign(w) * kept * (w.abs() * kept).sum() / kept.sum())
    ids = tiny_batch()
    with torch.no_grad():
        expected = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
    export_packed(model, tmp_path)
    loaded = load_packed(tmp_path, lambda: copy.deepcopy(tiny_bert_classifier(0))).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits, expected)
    with pytest.raises(ConfigError) as err:
        quantize_model(tiny_bert_classifier(0), {"groups": [{"patterns": ["query$"], "method": "half_ternary", "bits": 3}]})
    assert err.value.path == "kdqat.quant.groups[0].bits"
