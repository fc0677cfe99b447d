"""Fake-quantized tensors saved for the backward as integer codes (ds_kdqat.quant.codes): the codes rebuild the
forward's tensors bit for bit, the KD-QAT step gives the same losses and gradients as with float saves, the saved
bytes shrink, a weight is quantized once per optimizer step under accumulation, and memos do not outlive their
inputs."""

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from ds_kdqat.distill import DistillConfig, kd_forward, kd_phases, phase_at
from ds_kdqat.quant import QuantConfig, clear_quant_caches, quantize_model, reuse_quantized_weights
from ds_kdqat.quant import codes as codes_module
from ds_kdqat.quant import functional
from ds_kdqat.quant.codes import Codes, code_dtype, dropout_with_codes, fp32_saves, owns_storage, saved_as_codes
from ds_kdqat.quant.modules import ActQuantizer, QuantLinear, WeightQuantizer


def test_code_dtype_is_the_narrowest_that_holds_the_range():
    assert code_dtype(0, 255) == torch.uint8
    assert code_dtype(-127, 127) == torch.int8
    assert code_dtype(-128, 127) == torch.int8
    assert code_dtype(0, 4095) == torch.int16
    assert code_dtype(0, 65535) == torch.int32


@pytest.mark.parametrize("mode", ["minmax", "symmetric"])
@pytest.mark.parametrize("bits", [4, 8, 12])
@pytest.mark.parametrize("layout", [None, "contiguous", "transposed"])
def test_uniform_codes_rebuild_the_fake_quantized_tensor(mode, bits, layout):
    x = torch.randn(2, 3, 7, 5).transpose(1, 2) * 3  # a permuted layout, as attention's q/k/v are
    x_hat, codes = functional.uniform_with_codes(x, bits, mode, layout=layout)
    assert torch.equal(x_hat, functional._fake_uniform(x, bits, mode, "tensor", None))
    assert codes.codes.dtype == (torch.int16 if bits > 8 else torch.uint8 if mode == "minmax" else torch.int8)
    rebuilt = codes.values()
    assert torch.equal(rebuilt, x_hat) and rebuilt.stride() == x_hat.stride()
    if layout == "contiguous":
        assert x_hat.is_contiguous()
    if layout == "transposed":
        assert x_hat.transpose(-1, -2).is_contiguous()


@pytest.mark.parametrize("method,granularity", [("twn", "layer"), ("twn", "row"), ("lat", "layer"),
                                                ("binary", "layer"), ("uniform", "row")])
def test_weight_codes_rebuild_the_fake_quantized_weight(method, granularity):
    torch.manual_seed(0)
    w = torch.randn(24, 16)
    wq = WeightQuantizer(method, bits={"twn": 2, "lat": 2, "binary": 1, "uniform": 4}[method],
                         granularity=granularity)
    if method == "lat":
        wq.second_moment = torch.rand(24, 16) ** 4
    w_hat, codes = wq.with_codes(w)
    assert torch.equal(w_hat, wq(w))
    assert codes.codes.dtype == torch.int8 and torch.equal(codes.values(), w_hat)


def test_lsq_codes_rebuild_the_output():
    act = ActQuantizer(8, "symmetric", method="lsq")
    x = torch.randn(4, 9, 12, requires_grad=True)
    x_hat, codes = act.with_codes(x)
    assert codes.codes.dtype == torch.int8 and torch.equal(codes.values(), x_hat.detach())


def test_half_inputs_keep_statistics_in_float32():
    x = torch.randn(64, 48) * 5
    for dtype in (torch.bfloat16, torch.float16):
        low = x.to(dtype)
        out = functional.uniform_quantize(low, 8)
        assert out.dtype == dtype
        reference = functional._fake_uniform(low.float(), 8, "minmax", "tensor", None).to(dtype)
        assert torch.equal(out, reference)
        # TWN: Δ and α from float32 sums, α rounded to the weight's dtype once
        w_hat = functional.twn_ternarize(low)
        a = low.float().abs()
        support = a > 0.7 * a.mean()
        alpha = (a * support).sum() / support.sum()
        assert w_hat.dtype == dtype and torch.equal(w_hat.abs().max(), alpha.to(dtype))


def test_saved_tensors_are_codes_and_gradients_are_unchanged(monkeypatch):
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    QuantLinear.convert(linear, WeightQuantizer("twn"), ActQuantizer(8, "minmax"))
    x = torch.randn(3, 5, 16, requires_grad=True)
    packed = []
    original = codes_module._CodeSaver.pack

    def spy(self, t):
        out = original(self, t)
        packed.append(type(out).__name__)
        return out

    monkeypatch.setattr(codes_module._CodeSaver, "pack", spy)
    linear(x).square().sum().backward()
    grads = (x.grad.clone(), linear.weight.grad.clone(), linear.bias.grad.clone())
    # the input's and the weight's fake-quantized copies as codes; anything else saved is a parameter (some
    # CPU kernels of the linear also save the bias), kept as it is
    assert packed.count("_Saved") == 2 and set(packed) <= {"_Saved", "Parameter"}
    x.grad = linear.weight.grad = linear.bias.grad = None
    count = len(packed)
    with fp32_saves():
        linear(x).square().sum().backward()
    assert len(packed) == count  # no hook inside fp32_saves
    for new, old in zip(grads, (x.grad, linear.weight.grad, linear.bias.grad)):
        assert torch.equal(new, old)


def test_views_of_a_registered_tensor_are_rebuilt_with_their_strides():
    x_hat, codes = functional.uniform_with_codes(torch.randn(4, 6, 8), 8, layout="transposed")
    t = x_hat.detach().requires_grad_(True)
    y = torch.randn(4, 6, 5)
    with saved_as_codes((t, codes)):
        out = torch.matmul(t.transpose(1, 2), y)  # saves a transposed view of t's storage
    out.sum().backward()
    assert torch.equal(t.grad, torch.matmul(torch.ones(4, 8, 5), y.transpose(1, 2)).transpose(1, 2))
    assert owns_storage(x_hat) and not owns_storage(x_hat[1:])


def test_dropout_with_codes_is_pytorchs_dropout():
    x_hat, codes = functional.uniform_with_codes(torch.rand(2, 3, 9, 9), 8, layout="contiguous")
    torch.manual_seed(5)
    expected = F.dropout(x_hat, 0.3, training=True)
    torch.manual_seed(5)
    dropped, dropped_codes = dropout_with_codes(x_hat, codes, 0.3)
    assert torch.equal(dropped, expected) and torch.equal(dropped_codes.values(), expected)
    assert dropped_codes.factor.codes.dtype == torch.uint8


def tiny_teacher(dropout: float):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, num_labels=3, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout, initializer_range=0.2, attn_implementation="eager")
    return BertForSequenceClassification(config).eval()


def tiny_batches(n=3):
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(n):
        lengths = torch.randint(4, 13, (8,), generator=g)
        mask = (torch.arange(12)[None] < lengths[:, None]).long()
        batches.append({"input_ids": torch.randint(5, 64, (8, 12), generator=g) * mask, "attention_mask": mask,
                        "labels": torch.randint(0, 3, (8,), generator=g)})
    return batches


def run_steps(preset: str, recipe: str, fp32: bool, steps: int = 3):
    """``steps`` KD-QAT steps (the engine's forward half, backward, AdamW) with dropout on; the losses and, per
    step, every parameter's gradient."""
    teacher = tiny_teacher(dropout=0.1)
    student = copy.deepcopy(teacher)
    quantize_model(student, QuantConfig(preset=preset))
    student.train()
    phases, _ = kd_phases(DistillConfig(recipe=recipe), base_steps=steps, num_layers=2, task_type="classification")
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    losses, grads = [], []
    torch.manual_seed(123)
    for step, batch in enumerate(tiny_batches(steps)):
        if fp32:
            with fp32_saves():
                loss, _ = kd_forward(teacher, student, batch, phase_at(phases, step))
        else:
            loss, _ = kd_forward(teacher, student, batch, phase_at(phases, step))
        optimizer.zero_grad()
        loss.backward()  # the hooks live with the graph: the backward needs no context
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
        optimizer.step()
    return losses, grads


@pytest.mark.parametrize("preset,recipe", [("ternarybert", "ternarybert"), ("ternarybert_lsq", "map"),
                                           ("ternarybert_lat", "ti_map"), ("w8a8", "ti_output")])
def test_kd_step_with_codes_equals_the_float_saves(preset, recipe):
    new_losses, new_grads = run_steps(preset, recipe, fp32=False)
    old_losses, old_grads = run_steps(preset, recipe, fp32=True)
    assert new_losses == pytest.approx(old_losses, rel=1e-5, abs=0)
    for new, old in zip(new_grads, old_grads):
        assert new.keys() == old.keys() and len(new) > 10
        for name in new:
            torch.testing.assert_close(new[name], old[name], rtol=1e-5, atol=1e-7, msg=name)


def test_weights_are_quantized_once_per_optimizer_step(monkeypatch):
    teacher = tiny_teacher(dropout=0.0)
    student = copy.deepcopy(teacher)
    quantize_model(student, QuantConfig())
    student.train()
    calls = []
    original = functional.twn_with_codes
    monkeypatch.setattr("ds_kdqat.quant.methods.twn_with_codes",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    batch = tiny_batches(1)[0]
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def grads_of_two_micro_batches():
        student.zero_grad()
        for _ in range(2):
            student(**inputs).logits.square().sum().backward()
        return {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}

    linears = sum(isinstance(m, QuantLinear) for m in student.modules())
    every_time = grads_of_two_micro_batches()
    assert len(calls) == 2 * linears
    calls.clear()
    assert reuse_quantized_weights(student) == linears
    once = grads_of_two_micro_batches()
    assert len(calls) == linears  # the second micro batch rebuilt ŵ from the kept codes
    for name in every_time:
        assert torch.equal(once[name], every_time[name]), name
    clear_quant_caches(student)  # after the optimizer step: quantized afresh
    calls.clear()
    grads_of_two_micro_batches()
    assert len(calls) == linears
    reuse_quantized_weights(student, False)


def test_memo_is_dropped_with_its_input():
    act = ActQuantizer(8, "minmax", shared=True)
    x = torch.randn(4, 8, requires_grad=True) * 1
    first, _ = act.with_codes(x)
    again, _ = act.with_codes(x)
    assert again is first  # Q, K and V share one quantized input
    out_ref = weakref.ref(first)
    del first, again, x
    gc.collect()
    assert act.memo._entry is None and out_ref() is None  # nothing kept once the input is gone


@pytest.mark.parametrize("act_method,mode,weight", [("uniform", "minmax", "twn"), ("uniform", "symmetric", "twn"),
                                                    ("lsq", "symmetric", "binary"), ("uniform", "minmax", "uniform")])
def test_integer_forward_is_the_float_product_up_to_rounding(act_method, mode, weight):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    bits = {"twn": 2, "binary": 1, "uniform": 8}[weight]
    QuantLinear.convert(linear, WeightQuantizer(weight, bits=bits, granularity="row" if weight == "uniform" else
                                                "layer"), ActQuantizer(8, mode, method=act_method))
    x = torch.randn(4, 10, 64, requires_grad=True)
    upstream = torch.randn(4, 10, 48)
    reference = linear(x)
    (reference * upstream).sum().backward()
    grads = (x.grad.clone(), linear.weight.grad.clone(), linear.bias.grad.clone())
    x.grad = linear.weight.grad = linear.bias.grad = None
    linear.__dict__["integer_forward"] = True
    out = linear(x)
    assert out.grad_fn is not None and "IntegerLinear" in type(out.grad_fn).__name__
    # exact int32 sums against an fp32 GEMM of 64 products: a few float roundings apart
    torch.testing.assert_close(out, reference, rtol=0, atol=2e-6 * reference.abs().max().item())
    (out * upstream).sum().backward()
    for new, old in zip((x.grad, linear.weight.grad, linear.bias.grad), grads):
        assert torch.equal(new, old)  # the backward is the fake-quant one


def test_integer_forward_config_needs_an_int8_linear():
    from ds_kdqat.errors import ConfigError

    student = tiny_teacher(dropout=0.0)
    report = quantize_model(copy.deepcopy(student), QuantConfig(integer_forward=True))
    assert sum(e.activation.endswith("int8 GEMM") for e in report.entries) == 12  # 6 linears × 2 layers
    groups = [{"roles": ["ffn_in"], "method": "twn", "act_bits": None}]
    with pytest.raises(ConfigError, match=r"kdqat\.quant\.integer_forward"):
        quantize_model(copy.deepcopy(student), {"groups": groups, "integer_forward": True})
    with pytest.raises(ConfigError, match=r"kdqat\.quant\.integer_forward"):
        quantize_model(copy.deepcopy(student), {"integer_forward": "yes"})
