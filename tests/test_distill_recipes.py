"""Distill config, layer selection, recipes and the objective over hand-made taps."""

import pytest
import torch

from ds_kdqat.configtools import from_dict
from ds_kdqat.distill import losses
from ds_kdqat.distill.config import DistillConfig, LayerSelection, TeacherInterventionConfig, budget_multiplier
from ds_kdqat.distill.recipes import build_objective, term_coefficients
from ds_kdqat.errors import ConfigError
from ds_kdqat.models.taps import EncoderTaps

L, B, S, H, D = 3, 2, 4, 2, 6


def fake_taps(seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    scores = [r(B, H, S, S) for _ in range(L)]
    return EncoderTaps(
        embedding_output=None,
        attention_scores=scores,
        attention_maps=[torch.softmax(s, -1) for s in scores],
        contexts=[r(B, H, S, D // H) for _ in range(L)],
        mha_outputs=[r(B, S, D) for _ in range(L)],
        attention_outputs=[r(B, S, D) for _ in range(L)],
        layer_outputs=[r(B, S, D) for _ in range(L + 1)],
        logits=r(B, 3),
        attention_mask=torch.tensor([[True, True, True, True], [True, True, False, False]]),
    )


STUDENT, TEACHER = fake_taps(0), fake_taps(1)
MASK = STUDENT.attention_mask


def per_layer(fn, name, layers, **kw):
    return sum(fn(getattr(STUDENT, name)[l], getattr(TEACHER, name)[l], MASK, **kw) for l in layers)


def layer_outputs(indices):
    return sum(losses.hidden_mse(STUDENT.layer_outputs[i], TEACHER.layer_outputs[i], MASK) for i in indices)


def test_ternarybert_total_is_the_sum_of_its_terms():
    objective = build_objective(DistillConfig(), num_layers=L)
    assert objective.required_taps == {"layer_outputs", "attention_scores"}
    loss, terms = objective(STUDENT, TEACHER)
    pred = losses.soft_cross_entropy(STUDENT.logits, TEACHER.logits)
    layer = layer_outputs(range(L + 1))  # embedding output + every layer
    score = per_layer(losses.attention_score_mse, "attention_scores", range(L))
    torch.testing.assert_close(loss, pred + layer + score)
    assert set(terms) == {"pred", "layer_output", "attention_score", "total"}
    torch.testing.assert_close(terms["attention_score"], score)
    assert not terms["total"].requires_grad


@pytest.mark.parametrize("unified", ["SM1", "SM2"])
def test_map_output_unified(unified):
    config = DistillConfig(recipe="map_output", unified=unified, gamma=0.3, map_temperature=2.0, temperature=3.0)
    objective = build_objective(config, num_layers=L)
    assert objective.required_taps == {"layer_outputs", "attention_maps", "attention_outputs"}
    loss, terms = objective(STUDENT, TEACHER)
    amap = per_layer(losses.attention_map_kl, "attention_maps", range(L), temperature=2.0)
    out = per_layer(losses.attention_output_mse, "attention_outputs", range(L))
    pred = losses.soft_cross_entropy(STUDENT.logits, TEACHER.logits, 3.0)
    unified_loss = amap + 0.3 * out if unified == "SM1" else out + 0.3 * amap
    torch.testing.assert_close(loss, pred + layer_outputs(range(L + 1)) + unified_loss)
    torch.testing.assert_close(terms["attention_map"], amap)
    torch.testing.assert_close(terms["attention_output"], out)


def test_map_and_output_recipes_and_weights():
    config = from_dict(DistillConfig, {"recipe": "map", "weights": {"pred": 2.0, "layer_output": 0.5}})
    loss, terms = build_objective(config, num_layers=L)(STUDENT, TEACHER)
    expected = 2.0 * losses.soft_cross_entropy(STUDENT.logits, TEACHER.logits) + 0.5 * layer_outputs(range(L + 1)) \
        + per_layer(losses.attention_map_kl, "attention_maps", range(L))
    torch.testing.assert_close(loss, expected)
    config = DistillConfig(recipe="output")
    config.weights.layer_output = 0.0  # a zero weight removes the term
    objective = build_objective(config, num_layers=L)
    assert set(objective.coefficients) == {"pred", "attention_output"}
    assert objective.required_taps == {"attention_outputs"}


def test_custom_recipe_ground_truth_and_layer_selection():
    config = from_dict(DistillConfig, {
        "recipe": "custom", "terms": ["context", "mha_output", "layer_output"],
        "layers": {"mode": "list", "indices": [0, -1], "include_embedding": False},
        "weights": {"ground_truth": 0.25},
    })
    objective = build_objective(config, num_layers=L)
    assert objective.record_layers == (0, 2)
    labels = torch.tensor([2, 0])
    loss, terms = objective(STUDENT, TEACHER, labels)
    expected = per_layer(losses.context_mse, "contexts", [0, 2]) + per_layer(losses.mha_output_mse, "mha_outputs", [0, 2]) \
        + layer_outputs([1, 3]) + 0.25 * losses.ground_truth_cross_entropy(STUDENT.logits, labels)
    torch.testing.assert_close(loss, expected)
    assert set(terms) == {"context", "mha_output", "layer_output", "ground_truth", "total"}
    with pytest.raises(ValueError, match="needs labels"):
        objective(STUDENT, TEACHER)


def test_regression_uses_mse():
    config = DistillConfig(recipe="custom", terms=["pred", "ground_truth"])
    config.weights.ground_truth = 1.0
    student = EncoderTaps(logits=torch.tensor([[1.0], [2.0]]), attention_mask=MASK)
    teacher = EncoderTaps(logits=torch.tensor([[0.0], [0.0]]), attention_mask=MASK)
    loss, terms = build_objective(config, 2, "regression")(student, teacher, torch.tensor([1.0, 1.0]))
    assert terms["pred"].item() == pytest.approx(2.5) and terms["ground_truth"].item() == pytest.approx(0.5)
    assert loss.item() == pytest.approx(3.0)


def test_uniform_layer_selection():
    assert LayerSelection(mode="uniform", k=4).resolve(12) == (2, 5, 8, 11)
    assert LayerSelection(mode="uniform", k=2).resolve(4) == (1, 3)
    assert LayerSelection(mode="uniform", k=3).resolve(3) == (0, 1, 2)
    assert LayerSelection().resolve(3) == (0, 1, 2)
    with pytest.raises(ConfigError, match=r"^distill\.layers\.k: got 5; the model has only 3 layers"):
        build_objective(DistillConfig(layers=LayerSelection(mode="uniform", k=5)), num_layers=3)
    with pytest.raises(ConfigError, match=r"layers\.indices\[1\]: got 7"):
        LayerSelection(mode="list", indices=[0, 7]).resolve(3)


@pytest.mark.parametrize("data, path, message", [
    ({"recipe": "tinybert"}, "kdqat.distill.recipe", "allowed"),
    ({"temperature": 0}, "kdqat.distill.temperature", "> 0"),
    ({"gamma": -0.1}, "kdqat.distill.gamma", ">= 0"),
    ({"unified": "SM3"}, "kdqat.distill.unified", "SM1"),
    ({"recipe": "custom"}, "kdqat.distill.terms", "non-empty"),
    ({"terms": ["pred"]}, "kdqat.distill.terms", "only used by the \"custom\""),
    ({"recipe": "custom", "terms": ["logits"]}, "kdqat.distill.terms[0]", "allowed"),
    ({"layers": {"mode": "uniform"}}, "kdqat.distill.layers.k", "k >= 1"),
    ({"layers": {"k": 2}}, "kdqat.distill.layers.k", "only used with mode"),
    ({"weights": {"pred": -1}}, "kdqat.distill.weights.pred", ">= 0"),
    ({"weights": {"teacher": 1}}, "kdqat.distill.weights.teacher", "unknown key"),
    ({"ti": {"step_fraction": 1.5}}, "kdqat.distill.ti.step_fraction", "[0, 1]"),
    ({"ti": {"kd_recipe": "ti_map"}}, "kdqat.distill.ti.kd_recipe", "allowed"),
    ({"budget": "O3"}, "kdqat.distill.budget", "\"O\", \"O2\", \"O4\""),
    ({"budget": 0}, "kdqat.distill.budget", "> 0"),
])
def test_config_errors_name_the_key(data, path, message):
    with pytest.raises(ConfigError) as error:
        from_dict(DistillConfig, data, "kdqat.distill")
    assert error.value.path == path and message in error.value.message


def test_budget_and_all_zero_weights():
    assert [budget_multiplier(b) for b in ("O", "O2", "O4", 1.5)] == [1.0, 2.0, 4.0, 1.5]
    config = DistillConfig(recipe="custom", terms=["context"])
    config.weights.context = 0.0
    with pytest.raises(ConfigError, match="distill.weights: every term"):
        build_objective(config, num_layers=2)
    assert term_coefficients(DistillConfig(recipe="ti_gradual")) == {"pred": 1.0, "layer_output": 1.0,
                                                                     "attention_score": 1.0}
    config = DistillConfig(recipe="ti_map", gamma=0.2, ti=TeacherInterventionConfig(kd_recipe="map_output"))
    assert term_coefficients(config) == {"pred": 1.0, "layer_output": 1.0, "attention_map": 1.0,
                                         "attention_output": 0.2}
