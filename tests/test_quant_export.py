"""Bit packing, packed export / load round trip, size report."""

import json
import math
import os

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

from ds_kdqat.quant import QuantConfig, export_packed, load_packed, quantize_model, quantized_weights, size_report
from ds_kdqat.quant.packing import pack_base3, pack_bits, unpack_base3, unpack_bits


def test_pack_bits_hand_computed():
    codes = torch.tensor([0, 1, 2, 3, 1], dtype=torch.uint8)
    # little-endian 2-bit fields: 0 | 1<<2 | 2<<4 | 3<<6 = 228; then 1
    assert pack_bits(codes, 2).tolist() == [228, 1]
    assert pack_bits(torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1]), 1).tolist() == [0b1101, 1]
    # 3-bit fields across a byte boundary: 5 | 6<<3 | 7<<6 → 0b11110101 = 245, then 7>>2 = 1
    assert pack_bits(torch.tensor([5, 6, 7]), 3).tolist() == [245, 1]


def test_pack_base3_hand_computed():
    codes = torch.tensor([2, 1, 0, 2, 1, 1], dtype=torch.uint8)
    assert pack_base3(codes).tolist() == [2 + 3 + 0 + 54 + 81, 1]
    assert unpack_base3(pack_base3(codes), 6).tolist() == codes.tolist()


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_bits_roundtrip(bits):
    torch.manual_seed(bits)
    codes = torch.randint(0, 2**bits, (1001,), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.numel() == math.ceil(1001 * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, 1001), codes)


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        pack_bits(torch.tensor([4]), 2)
    with pytest.raises(ValueError, match="base-3"):
        pack_base3(torch.tensor([3]))


def tiny_config():
    return BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)


def fresh(seed=0):
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_config()).eval()


def batch():
    ids = torch.tensor([[2, 5, 7, 9, 3, 40], [2, 11, 3, 63, 0, 0]])
    return ids, (ids != 0).long()


@pytest.mark.parametrize("preset", ["ternarybert", "ternarybert_reference", "ternarybert_lat", "w8a8", "binary"])
@pytest.mark.parametrize("packing", ["2bit", "base3"])
def test_export_load_reproduces_logits(tmp_path, preset, packing):
    model = fresh()
    quantize_model(model, QuantConfig(preset=preset))
    if preset == "ternarybert_lat":  # give LAT a second moment so that it differs from TWN
        from ds_kdqat.quant import after_optimizer_step

        model.train()
        model(*batch()[:1], attention_mask=batch()[1], labels=torch.tensor([0, 1])).loss.backward()
        after_optimizer_step(model)
        model.eval()
    with torch.no_grad():
        model.bert.embeddings.position_embeddings.weight.mul_(1.5)  # a non-quantized tensor must travel as is
    ids, mask = batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    report = export_packed(model, tmp_path, ternary_packing=packing)
    assert sorted(os.listdir(tmp_path)) == ["manifest.json", "weights.safetensors"]  # no temp files left
    loaded = load_packed(tmp_path, lambda: fresh(seed=123))
    with torch.no_grad():
        got = loaded(input_ids=ids, attention_mask=mask).logits
    assert (got - expected).abs().max() <= 1e-5
    for name, w in quantized_weights(model).items():
        torch.testing.assert_close(loaded.get_submodule(name[:-7]).weight.detach(), w, atol=1e-7, rtol=0)
    assert report.packed_bytes == sum(os.path.getsize(tmp_path / f) for f in os.listdir(tmp_path))
    requantized = load_packed(tmp_path, fresh(seed=7), frozen=False)
    for name, w in quantized_weights(model).items():  # re-quantizing a decoded weight gives it back (to rounding)
        torch.testing.assert_close(quantized_weights(requantized)[name], w, atol=1e-6, rtol=1e-6)


def test_size_report_hand_computed(tmp_path):
    model = fresh()
    quantize_model(model)
    report = export_packed(model, tmp_path)
    n_params = sum(p.numel() for p in model.parameters())
    assert report.fp32_bytes == 4 * n_params
    ternary = 2 * (4 * 32 * 32 + 2 * 32 * 64) + 64 * 32
    assert report.ternary_weights == ternary
    assert report.wea == "2-2-8"
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["quantized"]["bert.encoder.layer.0.attention.self.query.weight"]["packing"] == "bits"
    # floor: ternary codes at log2(3) bits instead of 2 (one tensor at a time rounds up to whole bytes)
    code_bytes = sum(math.ceil(e["count"] / 4) for e in manifest["quantized"].values())
    assert report.floor_bytes == report.packed_bytes - code_bytes + math.ceil(ternary * math.log2(3) / 8)
    base3 = export_packed(model, tmp_path / "b3", ternary_packing="base3")
    saved = code_bytes - sum(math.ceil(e["count"] / 5) for e in manifest["quantized"].values())
    assert report.packed_bytes - base3.packed_bytes == pytest.approx(saved, abs=64)  # manifest text differs a bit
    assert "W-E-A 2-2-8" in report.row()
    assert size_report(tmp_path) == report  # read back from the directory


def test_export_errors(tmp_path):
    with pytest.raises(ValueError, match="not quantized"):
        export_packed(fresh(), tmp_path)
    tied = BertForMaskedLM(tiny_config())
    quantize_model(tied)
    with pytest.raises(ValueError, match="tied"):
        export_packed(tied, tmp_path)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        load_packed(tmp_path / "missing", fresh())
    model = fresh()
    quantize_model(model)
    export_packed(model, tmp_path)
    other = tiny_config()
    other.intermediate_size = 48
    with pytest.raises(ValueError, match="intermediate.dense"):
        load_packed(tmp_path, BertForSequenceClassification(other))
    different = fresh()
    quantize_model(different, {"preset": "binary"})
    with pytest.raises(ValueError, match="different config"):
        load_packed(tmp_path, different)


@pytest.mark.slow
def test_bert_base_export_is_at_most_one_fourteenth(tmp_path):
    """TernaryBERT reports 418 → 28 MB (14.9×) with the pooler ternarized too: the reference preset."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(num_labels=2)).eval()
    report = quantize_model(model, QuantConfig(preset="ternarybert_reference"))
    assert len(report.of_kind("linear")) == 73 and len(report.of_kind("embedding")) == 1
    size = export_packed(model, tmp_path)
    assert size.packed_bytes * 14 <= size.fp32_bytes
    ids = torch.randint(0, 30522, (2, 16))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        got = load_packed(tmp_path, lambda: BertForSequenceClassification(BertConfig(num_labels=2)).eval())(
            input_ids=ids).logits
    assert (got - expected).abs().max() <= 1e-5
