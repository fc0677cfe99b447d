"""quantize_model on tiny HF encoders: placement, report, reference preset, config errors."""

import copy

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, BertModel

from ds_kdqat.errors import ConfigError
from ds_kdqat.quant import (
    GroupConfig,
    QuantConfig,
    QuantEmbedding,
    QuantLinear,
    quant_config_from_dict,
    quantize_model,
    quantized_weights,
    twn_ternarize,
    uniform_quantize,
)
from ds_kdqat.quant.config import AttentionActConfig


def bert_config(layers=2, **kw):
    return BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, **kw)


def tiny_bert(layers=2):
    torch.manual_seed(0)
    return BertForSequenceClassification(bert_config(layers)).eval()


def batch():
    ids = torch.tensor([[2, 5, 7, 9, 3], [2, 11, 3, 0, 0]])
    return ids, (ids != 0).long()


def test_default_is_ternarybert_w2e2a8():
    model = tiny_bert(layers=3)
    names_before = [n for n, _ in model.named_parameters()]
    report = quantize_model(model)
    linears = [e.name for e in report.of_kind("linear")]
    assert len(linears) == 6 * 3
    assert {n.split(".", 4)[-1] for n in linears} == {"attention.self.query", "attention.self.key",
                                                      "attention.self.value", "attention.output.dense",
                                                      "intermediate.dense", "output.dense"}
    assert [e.name for e in report.of_kind("embedding")] == ["bert.embeddings.word_embeddings"]
    assert len(report.of_kind("attention")) == 3
    assert all(e.quantizer == "TWN 2-bit layer-wise" and e.activation == "A8 minmax" for e in report.of_kind("linear"))
    assert report.of_kind("embedding")[0].quantizer == "TWN 2-bit row-wise"
    assert report.of_kind("embedding")[0].params == 50 * 16
    assert report.quantized_params == 3 * (4 * 16 * 16 + 2 * 16 * 32) + 50 * 16
    # untouched: pooler, classifier, position/segment embeddings, LayerNorm; parameter names unchanged
    assert type(model.bert.pooler.dense) is nn.Linear and type(model.classifier) is nn.Linear
    assert type(model.bert.embeddings.position_embeddings) is nn.Embedding
    assert [n for n, _ in model.named_parameters()] == names_before
    att = model.bert.encoder.layer[0].attention.self
    assert att.query.act_quant is att.key.act_quant is att.value.act_quant  # one shared input quantizer
    assert model.bert.encoder.layer[0].attention.output.dense.act_quant is not att.query.act_quant
    assert sorted(att.kdqat_act_quant.keys()) == ["key", "map", "query", "value"]
    assert att.kdqat_act_quant["map"].describe() == "A8 minmax"
    assert "query" in report.table() and "18 linear, 1 embedding, 3 attention" in report.table()


def test_ternary_matrices_hold_at_most_three_values():
    model = tiny_bert()
    quantize_model(model)
    weights = quantized_weights(model)
    assert len(weights) == 13
    for name, w in weights.items():
        rows = list(w) if "word_embeddings" in name else [w]
        for row in rows:
            assert row.unique().numel() <= 3, name
            assert (row.abs().unique() > 0).sum() <= 1  # {-α, 0, α}


def test_quantized_forward_matches_manual_reference_layer():
    """One layer of the reference preset, recomputed by hand from the formulas."""
    model = tiny_bert()
    quantize_model(model, QuantConfig(preset="ternarybert_reference"))
    query = model.bert.encoder.layer[1].attention.self.query
    x = 3 * torch.randn(2, 5, 16)
    expected = torch.nn.functional.linear(uniform_quantize(x, 8, "symmetric", clip=2.5),
                                          twn_ternarize(query.weight, clip=2.5), query.bias)
    assert torch.equal(query(x), expected)
    assert isinstance(model.bert.pooler.dense, QuantLinear)
    assert model.bert.pooler.dense.act_quant.describe() == "A8 symmetric clip=2.5"
    assert isinstance(model.bert.embeddings.word_embeddings, QuantEmbedding)
    assert model.bert.embeddings.word_embeddings.weight_quant.describe() == "TWN 2-bit row-wise clip=2.5"
    att = model.bert.encoder.layer[0].attention.self.kdqat_act_quant
    assert all(att[p].describe() == "A8 symmetric clip=2.5" for p in ("query", "key", "value", "map"))


@pytest.mark.parametrize("preset", ["ternarybert", "ternarybert_lat", "ternarybert_reference", "w8a8", "binary"])
def test_presets_train_and_differ_from_fp32(preset):
    model = tiny_bert()
    teacher = copy.deepcopy(model)
    quantize_model(model, QuantConfig(preset=preset))
    ids, mask = batch()
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2])).loss
    out.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads[:-2])
    model.eval()
    with torch.no_grad():
        diff = (model(input_ids=ids, attention_mask=mask).logits
                - teacher(input_ids=ids, attention_mask=mask).logits).abs().max()
    assert 0 < diff < 1


def test_quantized_model_pickles_and_deepcopies_after_forward():
    import io

    model = tiny_bert()
    quantize_model(model)
    ids, mask = batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits  # fills caches and the Q/K/V input memo
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    for clone in (restored, copy.deepcopy(model)):
        with torch.no_grad():
            assert torch.equal(clone(input_ids=ids, attention_mask=mask).logits, expected)


def test_none_preset_keeps_fp32_logits():
    model = tiny_bert()
    ids, mask = batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    report = quantize_model(model, {"preset": "none"})
    assert report.entries == []
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, before, atol=1e-6, rtol=0)


def test_explicit_groups_replace_preset_and_attention_override():
    model = tiny_bert()
    config = quant_config_from_dict({
        "groups": [{"patterns": [r"intermediate\.dense$"], "method": "uniform", "bits": 4, "mode": "minmax",
                    "granularity": "row", "act_bits": None}],
        "attention": {"points": ["map"], "bits": 6, "mode": "symmetric"},
    })
    report = quantize_model(model, config)
    assert [e.name for e in report.of_kind("linear")] == [f"bert.encoder.layer.{i}.intermediate.dense" for i in (0, 1)]
    assert report.of_kind("linear")[0].quantizer == "uniform-minmax 4-bit row-wise"
    assert report.of_kind("linear")[0].activation == "-"
    assert not report.of_kind("embedding")
    att = model.bert.encoder.layer[0].attention.self.kdqat_act_quant
    assert list(att.keys()) == ["map"] and att["map"].describe() == "A6 symmetric"
    w = quantized_weights(model)["bert.encoder.layer.0.intermediate.dense.weight"]
    assert all(row.unique().numel() <= 16 for row in w)


def test_patterns_with_and_without_head_prefix_and_other_architectures():
    from transformers import RobertaConfig, RobertaForSequenceClassification, ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    base = BertModel(bert_config(), add_pooling_layer=False)
    report = quantize_model(base)
    assert len(report.of_kind("linear")) == 12 and report.of_kind("linear")[0].name == "encoder.layer.0.attention.self.query"
    roberta = RobertaForSequenceClassification(RobertaConfig(
        vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=40))
    report = quantize_model(roberta, QuantConfig(preset="ternarybert_reference"))
    assert len(report.of_kind("linear")) == 12  # no pooler in RoBERTa's classification model; head untouched
    assert type(roberta.classifier.dense) is nn.Linear
    roberta(input_ids=torch.tensor([[0, 5, 6, 2]])).logits.sum().backward()
    vit = ViTForImageClassification(ViTConfig(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=2,
                                              num_attention_heads=2, intermediate_size=32, num_labels=3))
    report = quantize_model(vit, {"attention": {"bits": None}})
    assert len(report.of_kind("linear")) == 12 and not report.of_kind("embedding")
    assert {e.name.split(".")[-1] for e in report.of_kind("linear")} == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                         "fc1", "fc2"}
    assert torch.isfinite(vit(pixel_values=torch.randn(2, 3, 8, 8)).logits).all()


@pytest.mark.parametrize("config,path,message", [
    ({"groups": [{"patterns": [r"nothing_here$"]}]}, "kdqat.quant.groups[0].patterns[0]", "matches no module"),
    ({"groups": [{"patterns": ["query$"]}, {"patterns": ["key$"], "bits": 4}]}, "kdqat.quant.groups[1].bits",
     "expected null or, for method 'twn', 2"),
    ({"groups": [{"patterns": ["query$"], "method": "uniform", "bits": 9}]}, "kdqat.quant.groups[0].bits", "2..8"),
    ({"groups": [{"patterns": ["query$"], "granularity": "col"}]}, "kdqat.quant.groups[0].granularity", '"row"'),
    ({"groups": [{"patterns": ["query$"], "clip": -1}]}, "kdqat.quant.groups[0].clip", "> 0"),
    ({"groups": [{"patterns": ["query$"], "act_bits": 1}]}, "kdqat.quant.groups[0].act_bits", "2..16"),
    ({"groups": [{"patterns": ["(query"]}]}, "kdqat.quant.groups[0].patterns[0]", "invalid regex"),
    ({"groups": [{"patterns": ["query$"]}, {"patterns": ["self\\.query$"]}]}, "kdqat.quant.groups[1].patterns[0]",
     "already matched by kdqat.quant.groups[0]"),
    ({"groups": [{"patterns": ["LayerNorm$"]}]}, "kdqat.quant.groups[0].patterns[0]", "of type LayerNorm"),
    ({"groups": [{"patterns": ["word_embeddings$"], "granularity": "row"}]}, "kdqat.quant.groups[0].act_bits",
     "embedding"),
    ({"groups": [{"patterns": ["query$"], "method": "ternary"}]}, "kdqat.quant.groups[0].method", '"lat"'),
    ({"groups": [{"patterns": ["query$"], "bitz": 2}]}, "kdqat.quant.groups[0].bitz", "unknown key"),
    ({"preset": "int4"}, "kdqat.quant.preset", "ternarybert_reference"),
    ({"attention": {"points": ["query", "score"]}}, "kdqat.quant.attention.points[1]", "'map'"),
    ({"attention": {"mode": "asym"}}, "kdqat.quant.attention.mode", '"minmax"'),
    ({"lat": {"beta2": 1.0}}, "kdqat.quant.lat.beta2", "[0, 1)"),
    ({"lat": {"iters": 0}}, "kdqat.quant.lat.iters", "1..1000"),
    ({"groups": [{"patterns": []}]}, "kdqat.quant.groups[0].patterns", "non-empty"),
])
def test_config_errors_name_the_key_path(config, path, message):
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError) as err:
        quantize_model(model, config)
    assert err.value.path == path
    assert message in err.value.message
    assert not any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules())  # left unchanged
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_preset_group_error_names_the_preset_and_requantizing_fails():
    model = tiny_bert()
    with pytest.raises(ConfigError) as err:
        quantize_model(model.bert.encoder, QuantConfig())
    assert err.value.path == "kdqat.quant.preset[ternarybert].groups[0].roles[0]"  # presets name roles
    quantize_model(model)
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_model(model)


def test_dataclass_defaults_and_validate():
    config = QuantConfig()
    config.validate()
    resolved = config.resolved()
    assert [g.method for g in resolved.groups] == ["twn", "twn"]
    assert resolved.attention == AttentionActConfig()
    with pytest.raises(ConfigError) as err:
        GroupConfig(patterns=["x"], method="binary", bits=2).validate("kdqat.quant.groups[3]")
    assert err.value.path == "kdqat.quant.groups[3].bits"


def bert_base(device="cpu"):
    with torch.device(device):
        return BertForSequenceClassification(BertConfig(num_labels=2))


@pytest.mark.parametrize("preset,linears", [("ternarybert", 72), ("ternarybert_reference", 73)])
def test_bert_base_shape_report(preset, linears):
    model = bert_base("meta")  # shapes only: conversion does not touch the values
    report = quantize_model(model, QuantConfig(preset=preset))
    assert len(report.of_kind("linear")) == linears
    assert ("bert.pooler.dense" in {e.name for e in report.of_kind("linear")}) == (preset != "ternarybert")
    assert [(e.name, e.params) for e in report.of_kind("embedding")] == [("bert.embeddings.word_embeddings",
                                                                          30522 * 768)]
    encoder = 12 * (4 * 768 * 768 + 2 * 768 * 3072)
    pooler = 768 * 768 if preset != "ternarybert" else 0
    assert report.quantized_params == encoder + pooler + 30522 * 768
    assert len(report.of_kind("attention")) == 12


@pytest.mark.slow
def test_bert_base_ternary_values():
    torch.manual_seed(0)
    model = bert_base()
    quantize_model(model, QuantConfig(preset="ternarybert_reference"))
    weights = quantized_weights(model)
    assert len(weights) == 74
    for name, w in weights.items():
        if "word_embeddings" in name:  # row-wise: at most 3 distinct values per row
            ordered = w.sort(dim=1).values
            assert ((ordered[:, 1:] != ordered[:, :-1]).sum(1) <= 2).all()
        else:
            assert w.unique().numel() <= 3, name
