"""Taps of BERT-family encoders equal HF's own outputs and the layer formulas."""

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    BertConfig, BertForSequenceClassification, BertModel, DistilBertConfig, DistilBertForSequenceClassification,
    ElectraConfig, ElectraForSequenceClassification, RobertaConfig, RobertaForSequenceClassification,
)

from ds_kdqat.models.families import FAMILIES, adapter_for
from ds_kdqat.models.taps import TAP_NAMES, forward_with_taps

SMALL = dict(vocab_size=50, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
             max_position_embeddings=40, attn_implementation="eager")


def make(kind):
    torch.manual_seed(0)
    if kind == "bert":
        return BertForSequenceClassification(BertConfig(hidden_size=16, num_labels=3, **SMALL))
    if kind == "bert-bare":
        return BertModel(BertConfig(hidden_size=16, **SMALL))
    if kind == "roberta":
        return RobertaForSequenceClassification(RobertaConfig(hidden_size=16, pad_token_id=1, **SMALL))
    if kind == "electra":  # embedding_size != hidden_size: X_0 is the projected embedding
        return ElectraForSequenceClassification(ElectraConfig(hidden_size=16, embedding_size=8, **SMALL))
    if kind == "distilbert":
        return DistilBertForSequenceClassification(DistilBertConfig(
            vocab_size=50, dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=40,
            attn_implementation="eager"))
    raise AssertionError(kind)


def batch():
    ids = torch.tensor([[2, 5, 7, 9, 3], [2, 11, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "labels": torch.tensor([0, 1])}


@pytest.mark.parametrize("kind", ["bert", "bert-bare", "roberta", "electra", "distilbert"])
def test_taps_equal_hf_outputs(kind):
    model = make(kind).eval()
    b = batch()
    inputs = {k: v for k, v in b.items() if k in ("input_ids", "attention_mask")}
    reference = model(**inputs, output_hidden_states=True, output_attentions=True)  # HF eager path
    taps = forward_with_taps(model, b, TAP_NAMES)
    assert len(taps.layer_outputs) == 3 and len(reference.hidden_states) == 3
    for ours, theirs in zip(taps.layer_outputs, reference.hidden_states):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    for ours, theirs in zip(taps.attention_maps, reference.attentions):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(taps.embedding_output, reference.hidden_states[0], atol=1e-5, rtol=0)
    if kind == "bert-bare":
        assert taps.logits is None
    else:
        torch.testing.assert_close(taps.logits, reference.logits, atol=1e-5, rtol=0)
    assert taps.attention_mask.dtype == torch.bool
    assert taps.attention_mask.tolist() == b["attention_mask"].bool().tolist()


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_taps_follow_the_layer_formulas(kind):
    model = make(kind).eval()
    b = batch()
    taps = forward_with_taps(model, b, TAP_NAMES)
    layers = adapter_for(model).layer_modules(model)
    adapter = adapter_for(model)
    for l, layer in enumerate(layers):
        score, amap, context = taps.attention_scores[l], taps.attention_maps[l], taps.contexts[l]
        assert score.shape == (2, 2, 5, 5) and context.shape == (2, 2, 5, 8)
        torch.testing.assert_close(amap, torch.softmax(score, -1))
        assert score[1, :, :, 3:].max() < -1e30  # padded keys carry the additive mask
        # map · V with V recomputed from the layer input
        value_linear = layer.get_submodule("attention.self.value" if kind == "bert" else "attention.v_lin")
        x = taps.layer_outputs[l]
        v = value_linear(x).view(2, 5, 2, 8).transpose(1, 2)
        torch.testing.assert_close(context, amap @ v, atol=1e-6, rtol=0)
        # MHA = Concat(context) W_O + b_O ;  Y = LayerNorm(X + MHA)
        out = adapter.mha_output_module(layer)
        torch.testing.assert_close(taps.mha_outputs[l], out(context.transpose(1, 2).reshape(2, 5, 16)), atol=1e-6,
                                   rtol=0)
        norm = layer.attention.output.LayerNorm if kind == "bert" else layer.sa_layer_norm
        expected_y = F.layer_norm(x + taps.mha_outputs[l], (16,), norm.weight, norm.bias, norm.eps)
        torch.testing.assert_close(taps.attention_outputs[l], expected_y, atol=1e-6, rtol=0)


def test_records_only_what_is_asked():
    model = make("bert").eval()
    taps = forward_with_taps(model, batch(), {"attention_maps"})
    assert len(taps.attention_maps) == 2 and taps.attention_scores == [] and taps.layer_outputs == []
    assert taps.embedding_output is None and taps.logits is not None
    taps = forward_with_taps(model, batch(), {"layer_outputs", "mha_outputs"}, layers=[1])
    assert taps.mha_outputs[0] is None and taps.mha_outputs[1] is not None
    assert taps.layer_outputs[0] is not None and taps.layer_outputs[1] is None and taps.layer_outputs[2] is not None
    with pytest.raises(KeyError, match=r"mha_outputs\[0\] was not recorded"):
        taps.get("mha_outputs", 0)
    # hooks are removed after the forward
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_student_taps_carry_gradients():
    model = make("bert").train()
    taps = forward_with_taps(model, batch(), {"attention_outputs"})
    taps.attention_outputs[0].sum().backward()
    assert model.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    assert model.bert.encoder.layer[1].output.dense.weight.grad is None  # after the tapped point


def test_bad_requests():
    model = make("bert")
    with pytest.raises(ValueError, match="unknown tap names"):
        forward_with_taps(model, batch(), {"attention_probs"})
    with pytest.raises(ValueError, match="needs 'input_ids'"):
        forward_with_taps(model, {"attention_mask": torch.ones(1, 2)}, set())
    model.config.model_type = "gpt2"
    with pytest.raises(ValueError, match="no encoder adapter for model_type 'gpt2'"):
        forward_with_taps(model, batch(), set())
    assert {"bert", "roberta", "electra", "distilbert"} <= set(FAMILIES)


def test_model_loaded_with_kdqat_attention_gets_its_layers_numbered():
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(hidden_size=16, **{**SMALL, "attn_implementation": "kdqat"}))
    model.eval()
    taps = forward_with_taps(model, batch(), {"attention_maps"})
    assert all(m is not None for m in taps.attention_maps)
    torch.testing.assert_close(taps.attention_maps[0], model(**{k: batch()[k] for k in ("input_ids", "attention_mask")},
                                                             output_attentions=True).attentions[0])
