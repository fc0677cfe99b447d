"""The kdqat attention function equals HF's eager attention and exposes its seams."""

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from ds_kdqat.models.attention import active_session, use_kdqat_attention


def tiny_bert(**overrides):
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation="eager", **overrides,
    )
    torch.manual_seed(0)
    return BertForSequenceClassification(config).eval()


class Recorder:
    def __init__(self, replace=None):
        self.seen, self.replace = {}, replace or {}

    def record(self, layer, name, tensor):
        self.seen[(layer, name)] = tensor

    def replacement(self, layer, name):
        return self.replace.get((layer, name))


def batch():
    ids = torch.tensor([[2, 5, 7, 9, 3], [2, 11, 3, 0, 0]])
    return ids, (ids != 0).long()


def test_matches_eager_with_padding():
    model = tiny_bert()
    ids, mask = batch()
    reference = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert use_kdqat_attention(model) == 2
    ours = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    torch.testing.assert_close(ours.logits, reference.logits, atol=1e-6, rtol=0)
    for a, b in zip(ours.attentions, reference.attentions):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_taps_and_map_replacement():
    model = tiny_bert()
    use_kdqat_attention(model)
    ids, mask = batch()
    plain = Recorder()
    with active_session(plain):
        model(input_ids=ids, attention_mask=mask)
    score = plain.seen[(0, "attention_score")]
    assert score.shape == (2, 2, 5, 5)
    # padded keys get the additive mask; map rows sum to one over valid keys only
    amap = plain.seen[(0, "attention_map")]
    torch.testing.assert_close(amap.sum(-1), torch.ones(2, 2, 5))
    assert amap[1, :, :, 3:].abs().max() < 1e-12

    uniform = torch.full((2, 2, 5, 5), 0.2, requires_grad=True)
    replaced = Recorder({(1, "attention_map"): uniform})
    with active_session(replaced):
        model(input_ids=ids, attention_mask=mask).logits.sum().backward()
    assert uniform.grad is None  # the replacement is detached
    context = replaced.seen[(1, "context")]
    assert context.shape == (2, 2, 5, 8)
    # uniform map: every query row's context is the mean of V over all five keys
    torch.testing.assert_close(context[:, :, 0], context[:, :, 4])


def test_act_quant_seam_is_applied():
    model = tiny_bert()
    use_kdqat_attention(model)
    ids, mask = batch()
    calls = []

    class Spy(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x):
            calls.append(self.name)
            return torch.zeros_like(x) if self.name == "value" else x

    model.bert.encoder.layer[0].attention.self.kdqat_act_quant = nn.ModuleDict(
        {n: Spy(n) for n in ("query", "key", "value", "map")}
    )
    rec = Recorder()
    with active_session(rec):
        model(input_ids=ids, attention_mask=mask)
    assert sorted(calls) == ["key", "map", "query", "value"]
    assert rec.seen[(0, "context")].abs().max() == 0


def test_vit_attention_is_routed_and_matches_eager():
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                       image_size=32, patch_size=16, attn_implementation="eager")
    model = ViTModel(config).eval()
    pixels = torch.randn(2, 3, 32, 32)
    reference = model(pixel_values=pixels).last_hidden_state
    assert use_kdqat_attention(model) == 2
    rec = Recorder()
    with active_session(rec):
        ours = model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)
    assert rec.seen[(1, "attention_map")].shape == (2, 2, 5, 5)  # 4 patches + [CLS]
