"""Quantized modules: same parameters, reference forward, STE gradients, LAT second moment, eval cache."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ds_kdqat.quant import (
    ActQuantizer,
    LatConfig,
    QuantEmbedding,
    QuantLinear,
    WeightQuantizer,
    after_optimizer_step,
    lat_state,
    load_lat_state,
    twn_ternarize,
    uniform_quantize,
)


def linear(seed=0, n_in=6, n_out=4):
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out)


def test_quant_linear_keeps_parameters_and_matches_reference():
    lin = linear()
    weight, bias = lin.weight, lin.bias
    q = QuantLinear.convert(lin, WeightQuantizer("twn"), ActQuantizer(8, "minmax"))
    assert q is lin and q.weight is weight and q.bias is bias
    assert [n for n, _ in q.named_parameters()] == ["weight", "bias"]
    assert set(q.state_dict()) == {"weight", "bias"}
    x = torch.randn(3, 5, 6)
    expected = F.linear(uniform_quantize(x, 8, "minmax"), twn_ternarize(weight), bias)
    assert torch.equal(q(x), expected)


def test_quant_linear_straight_through_gradient():
    lin = linear()
    QuantLinear.convert(lin, WeightQuantizer("twn"), None)
    x = torch.randn(7, 6)
    g = torch.randn(7, 4)
    lin(x).backward(g)
    w_hat = twn_ternarize(lin.weight.detach())
    # y = x·ŵᵀ + b: dL/dŵ = gᵀ·x, passed unchanged to the latent weight; dL/dx uses ŵ
    torch.testing.assert_close(lin.weight.grad, g.T @ x)
    torch.testing.assert_close(lin.bias.grad, g.sum(0))
    x2 = x.clone().requires_grad_()
    lin(x2).backward(g)
    torch.testing.assert_close(x2.grad, g @ w_hat)


def test_convert_rejects_other_module_types():
    class MyLinear(nn.Linear):
        pass

    with pytest.raises(TypeError, match="nn.Linear"):
        QuantLinear.convert(MyLinear(2, 2), WeightQuantizer())
    with pytest.raises(TypeError, match="nn.Embedding"):
        QuantEmbedding.convert(nn.Linear(2, 2), WeightQuantizer())


@pytest.mark.parametrize("method,granularity,clip", [("twn", "row", None), ("twn", "row", 0.5),
                                                      ("binary", "row", None), ("uniform", "row", None),
                                                      ("twn", "layer", None), ("lat", "row", None)])
def test_quant_embedding_equals_lookup_in_quantized_table(method, granularity, clip):
    torch.manual_seed(0)
    emb = nn.Embedding(20, 8, padding_idx=0)
    table = emb.weight
    QuantEmbedding.convert(emb, WeightQuantizer(method, 8 if method == "uniform" else 2, granularity, clip))
    ids = torch.tensor([[1, 4, 4, 0], [19, 2, 0, 0]])
    out = emb(ids)
    reference_table = emb.weight_quant.parts(table)
    from ds_kdqat.quant import dequantize_parts

    torch.testing.assert_close(out, F.embedding(ids, dequantize_parts(reference_table)), atol=1e-7, rtol=0)
    g = torch.randn_like(out)
    out.backward(g)
    grad = torch.zeros(20, 8)
    for pos, i in enumerate(ids.reshape(-1).tolist()):
        if i != 0:  # padding_idx gets no gradient
            grad[i] += g.reshape(-1, 8)[pos]
    if clip is not None:
        grad = grad * (table.detach().abs() < clip)
    torch.testing.assert_close(table.grad, grad)


def test_lat_accumulates_and_folds_like_adam():
    """v equals torch Adam's exp_avg_sq (same β2, no bias correction stored) when fed the same gradients."""
    torch.manual_seed(0)
    lin = linear()
    QuantLinear.convert(lin, WeightQuantizer("lat", lat=LatConfig(beta2=0.9)), None)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, betas=(0.5, 0.9))
    for step in range(4):
        for _ in range(2):  # two micro-batches accumulate into one step
            lin(torch.randn(5, 6)).pow(2).mean().backward()
        opt.step()
        assert after_optimizer_step(lin) == 1
        opt.zero_grad()
        torch.testing.assert_close(lin.weight_quant.second_moment, opt.state[lin.weight]["exp_avg_sq"])
        assert lin.weight_quant.grad_accum.abs().max() == 0
    # with v present the forward uses LAT: the weight is ternary with the D-weighted α
    w_hat = lin.quantized_weight()
    assert w_hat.unique().numel() <= 3


def test_lat_hand_computed_fold():
    q = WeightQuantizer("lat", lat=LatConfig(beta2=0.75))
    q.fold_gradient(torch.tensor([2.0, -4.0]))
    torch.testing.assert_close(q.second_moment, torch.tensor([1.0, 4.0]))  # 0.25·g²
    q.fold_gradient(torch.tensor([0.0, 2.0]))
    torch.testing.assert_close(q.second_moment, torch.tensor([0.75, 4.0]))  # 0.75·v + 0.25·g²


def test_after_optimizer_step_noop_and_state_roundtrip():
    plain = linear()
    QuantLinear.convert(plain, WeightQuantizer("twn"), None)
    plain(torch.randn(2, 6)).sum().backward()
    assert after_optimizer_step(plain) == 0
    model = nn.Sequential(linear(1), linear(2, 4, 3))
    for m in model:
        QuantLinear.convert(m, WeightQuantizer("lat"), None)
    model(torch.randn(3, 6)).sum().backward()
    assert after_optimizer_step(model) == 2
    state = lat_state(model)
    assert set(state) == {"0.weight_quant.second_moment", "1.weight_quant.second_moment"}
    other = nn.Sequential(linear(1), linear(2, 4, 3))
    for m in other:
        QuantLinear.convert(m, WeightQuantizer("lat"), None)
    load_lat_state(other, state)
    assert torch.equal(other[1].weight_quant.second_moment, model[1].weight_quant.second_moment)
    with pytest.raises(KeyError, match="not the second moment"):
        load_lat_state(other, {"2.weight_quant.second_moment": torch.ones(1)})


def test_eval_cache_tracks_weight_changes():
    lin = linear()
    QuantLinear.convert(lin, WeightQuantizer("twn"), None)
    lin.eval()
    with torch.no_grad():
        first = lin.quantized_weight()
        assert lin.quantized_weight() is first  # cached
        lin.weight.mul_(2)  # an in-place update (as an optimizer step) invalidates it
        second = lin.quantized_weight()
    assert second is not first
    torch.testing.assert_close(second, 2 * first)
    lin.train()
    assert "_kdqat_qcache" not in lin.__dict__
    with torch.no_grad():
        assert lin.quantized_weight() is not lin.quantized_weight()  # training mode: never cached
    lin.eval()
    assert lin.quantized_weight().requires_grad  # grad enabled: not cached, differentiable


def test_act_quantizer_describes_and_quantizes():
    aq = ActQuantizer(4, "symmetric", 1.0)
    assert aq.describe() == "A4 symmetric clip=1"
    x = torch.tensor([2.0, -0.5, 0.1])
    # clamp → [1, -0.5, 0.1]; s = 7/1 → round([7, -3.5, 0.7]) = [7, -4, 1] → /7
    torch.testing.assert_close(aq(x), torch.tensor([1.0, -4 / 7, 1 / 7]))


def test_shared_act_quantizer_reuses_output_only_for_the_same_unmodified_input():
    aq = ActQuantizer(2, "minmax", shared=True)
    x = torch.tensor([0.0, 1.0, 3.0])
    first = aq(x)
    assert aq(x) is first  # same tensor object, unchanged: quantized once
    assert aq(x.clone()) is not first
    x.mul_(2)  # in place: the version counter changes
    torch.testing.assert_close(aq(x), torch.tensor([0.0, 2.0, 6.0]))
    unshared = ActQuantizer(2, "minmax")
    assert unshared(x) is not unshared(x)
