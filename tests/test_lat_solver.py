"""The LAT solver against the alternating updates written out plainly: equal α and codes, bit for bit."""

import pytest
import torch

from ds_kdqat.quant import functional
from ds_kdqat.quant.functional import (
    TWN_THRESHOLD_FACTOR,
    QuantParts,
    _fake_lat,
    dequantize_parts,
    lat_parts,
    lat_ternarize,
    twn_ternarize,
)


def reference_lat(w, v, granularity="layer", clip=None, iters=10, eps=1e-6):
    """Hou & Kwok's approximate solver as TernaryBERT describes it, with fresh tensors at every step: start from
    TWN's codes; α = Σ D·|w|·|b| / Σ D·|b| (0 on an empty support); b = sign(w)·[|w| > α/2]; stop when b does not
    change (then b and the α it gave) or after ``iters`` rounds (then the last b and its α)."""
    w = w.detach()
    if clip is not None:
        w = w.clamp(-clip, clip)
    dims = None if granularity == "layer" else tuple(range(1, w.dim()))

    def total(x):
        if dims is None:
            return x.sum()
        return x.sum(dim=dims, keepdim=True) if dims else x

    def mean(x):
        if dims is None:
            return x.mean()
        return x.mean(dim=dims, keepdim=True) if dims else x

    def alpha_of(b):
        num, den = total(d * abs_w * b.abs()), total(d * b.abs())
        return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))

    abs_w = w.abs()
    d = v.to(w.dtype).sqrt() + eps
    sign = torch.sign(w)
    b = sign * (abs_w > TWN_THRESHOLD_FACTOR * mean(abs_w))
    for _ in range(iters):
        alpha = alpha_of(b)
        new_b = sign * (abs_w > alpha / 2).to(w.dtype)
        if torch.equal(new_b, b):
            return QuantParts("ternary", b, alpha)
        b = new_b
    return QuantParts("ternary", b, alpha_of(b))


def random_case(shape, seed, zeros=False):
    g = torch.Generator().manual_seed(seed)
    scale = 10 ** (torch.rand((), generator=g) * 4 - 3)
    w = torch.randn(shape, generator=g) * scale
    if zeros and w.numel() > 1:
        w.view(-1)[::3] = 0
    v = torch.rand(shape, generator=g).pow(4) * 10 ** (torch.rand((), generator=g) * 8 - 8)
    return w, v


def assert_same(parts, ref):
    assert parts.scale.shape == ref.scale.shape
    assert torch.equal(parts.scale, ref.scale), (parts.scale, ref.scale)
    assert torch.equal(parts.codes, ref.codes)


CASES = [((7, 5), 0), ((64, 33), 1), ((300, 200), 2), ((16,), 3), ((3, 4, 5), 4), ((1, 1), 5), ((768, 96), 6)]


@pytest.mark.parametrize("shape,seed", CASES)
@pytest.mark.parametrize("granularity", ["layer", "row"])
def test_solver_equals_the_plain_alternating_updates(shape, seed, granularity):
    w, v = random_case(shape, seed, zeros=seed % 2 == 0)
    for clip in (None, float(w.abs().mean() * 1.5)):
        for iters in (1, 2, 10, 60):
            ref = reference_lat(w, v, granularity, clip, iters)
            assert_same(lat_parts(w, v, granularity, clip, iters), ref)
            fake = _fake_lat(w, v, granularity, clip, iters, 1e-6)
            expected = dequantize_parts(ref)
            assert torch.equal(fake, expected) and torch.equal(fake.signbit(), expected.signbit())


def test_converged_and_capped_runs_both_match():
    # a BERT-sized matrix: its cold start needs more than 10 rounds (so iters=10 is the capped branch) and
    # converges within 60 (the early exit)
    w, v = random_case((768, 768), 7)
    capped, converged = (lat_parts(w, v, "layer", None, iters) for iters in (10, 60))
    assert_same(capped, reference_lat(w, v, "layer", None, 10))
    assert_same(converged, reference_lat(w, v, "layer", None, 60))
    assert not torch.equal(capped.codes, converged.codes)  # 10 rounds stop a few codes short of the fixed point


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("granularity", ["layer", "row"])
def test_other_dtypes(dtype, granularity):
    # 1000 × 300: more elements than a bf16/fp16 sum counts exactly (the support sizes are counted in float32;
    # counted in the weight's dtype, sizes a few apart look equal and the loop stops early)
    for shape in ((40, 24), (1000, 300)):
        w, v = random_case(shape, 8)
        w = w.to(dtype)
        for iters in (3, 10, 60):
            assert_same(lat_parts(w, v, granularity, None, iters), in_dtype_of(w, reference_lat(
                solved_as(w), v, granularity, None, iters)))


def solved_as(w):
    """LAT's statistics are float32 for fp16/bf16 weights: the solver runs on the weight converted to float32."""
    return w.float() if w.dtype in (torch.bfloat16, torch.float16) else w


def in_dtype_of(w, parts):
    """The reference's codes and α rounded to ``w``'s dtype, as the solver returns them."""
    return QuantParts(parts.kind, parts.codes.to(w.dtype), parts.scale.to(w.dtype))


def test_rows_of_a_table_are_quantized_as_in_the_table():
    w, v = random_case((100, 24), 9)
    rows = torch.tensor([3, 7, 3, 99, 0, 50])
    table = reference_lat(w, v, "row")
    parts = lat_parts(w[rows], v, "row", rows=rows)
    assert torch.equal(parts.codes, table.codes[rows]) and torch.equal(parts.scale, table.scale[rows])
    fake = _fake_lat(w[rows], v, "row", None, 10, 1e-6, rows=rows)
    assert torch.equal(fake, dequantize_parts(table)[rows])
    # a float32 table with a bf16 weight: only the looked-up rows are converted
    low = w.to(torch.bfloat16)
    assert torch.equal(lat_parts(low[rows], v, "row", rows=rows).codes,
                       reference_lat(low.float(), v, "row").codes[rows].to(low.dtype))
    with pytest.raises(ValueError, match="rows"):
        lat_parts(w[rows], v, "row", rows=rows[:2])
    with pytest.raises(ValueError, match="row granularity"):
        lat_parts(w[rows], v, "layer", rows=rows)


def test_workspace_is_reused_and_large_requests_get_temporaries(monkeypatch):
    w, v = random_case((50, 40), 10)
    lat_parts(w, v)
    buffer = functional._LAT_WORKSPACE.buffers[(w.device, w.dtype)]
    lat_parts(w * 2, v)  # same size or smaller: the same buffer, not reallocated
    lat_parts(w[:10], v[:10])
    assert functional._LAT_WORKSPACE.buffers[(w.device, w.dtype)] is buffer
    monkeypatch.setattr(functional, "LAT_WORKSPACE_MAX_ELEMENTS", 100)
    assert_same(lat_parts(w, v, "row"), reference_lat(w, v, "row"))


def test_without_second_moment_is_twn_and_gradient_is_straight_through():
    w, v = random_case((6, 5), 11)
    assert torch.equal(lat_ternarize(w, None), twn_ternarize(w))
    x = w.clone().requires_grad_(True)
    out = lat_ternarize(x, v, clip=float(w.abs().max() / 2))
    out.backward(torch.ones_like(out))
    assert torch.equal(x.grad, (w.abs() < w.abs().max() / 2).float())
