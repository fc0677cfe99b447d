"""Functional quantizers against hand-computed values, STE gradients and degenerate inputs."""

import pytest
import torch

from ds_kdqat.quant import (
    binarize,
    lat_parts,
    lat_ternarize,
    twn_parts,
    twn_ternarize,
    uniform_parts,
    uniform_quantize,
)

W = torch.tensor([[0.1, -0.5, 1.0], [-2.0, 0.05, 0.3]])


def close(a, b, tol=1e-6):
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype).expand_as(a), atol=tol, rtol=0)


# ---------------------------------------------------------------------------------------------------------------- TWN


def test_twn_layer_hand_computed():
    # mean|w| = 3.95/6, Δ = 0.7·mean = 0.46083; kept: -0.5, 1.0, -2.0 → α = 3.5/3
    a = 3.5 / 3
    close(twn_ternarize(W), [[0, -a, a], [-a, 0, 0]])
    parts = twn_parts(W)
    close(parts.scale, a)
    close(parts.codes, [[0, -1, 1], [-1, 0, 0]])


def test_twn_row_hand_computed():
    # row 0: Δ = 0.7·1.6/3 = 0.3733 → keep -0.5, 1.0, α = 0.75; row 1: Δ = 0.7·2.35/3 = 0.5483 → keep -2, α = 2
    close(twn_ternarize(W, granularity="row"), [[0, -0.75, 0.75], [-2.0, 0, 0]])
    assert twn_parts(W, "row").scale.shape == (2, 1)


def test_twn_tie_at_threshold_maps_to_zero():
    # x is the float32 for which 0.7·mean(|[x, 2, -2, 0]|) == x exactly: |w| = Δ is not kept
    x = 0.8484848737716675
    w = torch.tensor([x, 2.0, -2.0, 0.0])
    assert (0.7 * w.abs().mean()).item() == w[0].item()
    close(twn_ternarize(w), [0, 2, -2, 0])
    close(twn_ternarize(torch.stack([w, w]), granularity="row"), [[0, 2, -2, 0]] * 2)


def test_twn_clip_values_and_gradient():
    # clamp to ±2.5 → [2.5, -2.5, 0.5, 0.1]; mean 1.4, Δ 0.98 → α = 2.5
    w = torch.tensor([3.0, -4.0, 0.5, 0.1, 2.5], requires_grad=True)
    out = twn_ternarize(w, clip=2.5)
    # with the 5th element (2.5, clamped to itself): mean = 8.1/5 = 1.62, Δ = 1.134 → kept 2.5, -2.5, 2.5
    close(out, [2.5, -2.5, 0, 0, 2.5])
    out.backward(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    # zero where |w| >= clip (the boundary counts as clipped, as in TernaryBERT's code)
    close(w.grad, [0, 0, 3.0, 4.0, 0])


@pytest.mark.parametrize("fn", [
    lambda w: twn_ternarize(w),
    lambda w: twn_ternarize(w, granularity="row"),
    lambda w: binarize(w),
    lambda w: lat_ternarize(w, torch.rand_like(w)),
    lambda w: uniform_quantize(w, 8, "minmax"),
    lambda w: uniform_quantize(w, 4, "symmetric", "row"),
])
def test_straight_through_gradient_is_identity(fn):
    torch.manual_seed(0)
    w = torch.randn(5, 7, requires_grad=True)
    g = torch.randn(5, 7)
    fn(w).backward(g)
    assert torch.equal(w.grad, g)


# --------------------------------------------------------------------------------------------------------- degenerate


@pytest.mark.parametrize("fn", [
    lambda w: twn_ternarize(w),
    lambda w: twn_ternarize(w, granularity="row"),
    lambda w: twn_ternarize(w, clip=1.0),
    lambda w: lat_ternarize(w, torch.zeros_like(w)),
    lambda w: lat_ternarize(w, torch.ones_like(w), granularity="row"),
    lambda w: binarize(w),
    lambda w: binarize(w, granularity="row"),
    lambda w: uniform_quantize(w, 8, "minmax"),
    lambda w: uniform_quantize(w, 8, "symmetric"),
    lambda w: uniform_quantize(w, 3, "minmax", "row"),
    lambda w: uniform_quantize(w, 3, "symmetric", "row"),
])
def test_degenerate_inputs(fn):
    zeros = torch.zeros(3, 4)
    assert torch.equal(fn(zeros), zeros)
    const = torch.full((3, 4), -0.75)
    torch.testing.assert_close(fn(const), const, atol=0.75 / 127, rtol=0)  # exact except 3-bit symmetric grid
    one = torch.tensor([[-0.3]])
    assert torch.isfinite(fn(one)).all()
    zero_row = torch.randn(3, 4)
    zero_row[1] = 0
    out = fn(zero_row)
    assert torch.isfinite(out).all()


def test_degenerate_exact_values():
    close(twn_ternarize(torch.full((2, 3), 0.4)), 0.4)  # Δ = 0.28, α = 0.4
    close(twn_ternarize(torch.tensor([-3.0])), -3.0)
    close(twn_ternarize(torch.tensor([0.5, -2.0, 0.0]), granularity="row"), [0.5, -2.0, 0.0])  # 1-D: a row each
    close(uniform_quantize(torch.full((4,), 5.0), 8, "minmax"), 5.0)  # zero range: the input back
    close(binarize(torch.tensor([[0.0, 0.0], [1.0, -3.0]]), granularity="row"), [[0, 0], [2, -2]])
    w = torch.tensor([[0.0, 0.0, 0.0], [0.3, -0.3, 0.0]])
    close(twn_ternarize(w, granularity="row"), [[0, 0, 0], [0.3, -0.3, 0]])


# ------------------------------------------------------------------------------------------------- binary / uniform


def test_binarize_hand_computed():
    w = torch.tensor([[1.0, -3.0], [0.0, 2.0]])
    close(binarize(w), [[1.5, -1.5], [1.5, 1.5]])  # α = 6/4; sign(0) = +1
    close(binarize(w, granularity="row"), [[2.0, -2.0], [1.0, 1.0]])


def test_uniform_minmax_hand_computed():
    x = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    # 2 bits: s = 3/3 = 1; (x+1) = [0, 1, 1.5, 3] → round (half to even) [0, 1, 2, 3] → [-1, 0, 1, 2]
    close(uniform_quantize(x, 2, "minmax"), [-1.0, 0.0, 1.0, 2.0])
    s = 3.0 / 255
    expected = torch.round((x + 1) / s) * s - 1
    close(uniform_quantize(x, 8, "minmax"), expected)


def test_uniform_symmetric_hand_computed():
    x = torch.tensor([-1.0, 0.2, 0.5, 2.0])
    # 3 bits: s = 3/2 = 1.5; x·s = [-1.5, 0.3, 0.75, 3] → [-2, 0, 1, 3] → /1.5
    close(uniform_quantize(x, 3, "symmetric"), [-2 / 1.5, 0.0, 1 / 1.5, 2.0])
    parts = uniform_parts(x, 3, "symmetric")
    close(parts.codes, [-2, 0, 1, 3])
    close(parts.scale, 1.5)


def test_uniform_row_granularity():
    x = torch.tensor([[0.0, 1.0, 3.0], [-2.0, -1.0, 10.0]])
    # row 0: s = 3/3 → [0, 1, 3]; row 1: s = 12/3 = 4 → (x+2)/4 = [0, 0.25, 3] → [0, 0, 3] → [-2, -2, 10]
    close(uniform_quantize(x, 2, "minmax", "row"), [[0.0, 1.0, 3.0], [-2.0, -2.0, 10.0]])


def test_uniform_symmetric_clip_values_and_gradient():
    x = torch.tensor([3.0, -1.0, 0.5], requires_grad=True)
    out = uniform_quantize(x, 8, "symmetric", clip=2.5)
    s = 127 / 2.5  # max|clamp(x)| = 2.5
    close(out, [2.5, -51 / s, 25 / s])
    out.backward(torch.ones(3))
    close(x.grad, [0.0, 1.0, 1.0])


def test_bad_arguments():
    with pytest.raises(ValueError, match="granularity"):
        twn_ternarize(W, granularity="column")
    with pytest.raises(ValueError, match="bits"):
        uniform_quantize(W, 1)
    with pytest.raises(ValueError, match="mode"):
        uniform_quantize(W, 8, mode="asym")
    with pytest.raises(ValueError, match="clip"):
        twn_ternarize(W, clip=0.0)
    with pytest.raises(ValueError, match="second_moment"):
        lat_ternarize(W, torch.ones(3))


# ---------------------------------------------------------------------------------------------------------------- LAT


def weighted_error(w, w_hat, v, eps=1e-6):
    return ((v.sqrt() + eps) * (w - w_hat) ** 2).sum().item()


def test_lat_hand_computed():
    # TWN: mean = 1.4, Δ = 0.98 → support {1, 3}, α = 2. With D = [1, 10, 1]:
    # α = (10·1 + 1·3)/(10 + 1) = 13/11; b = [|w| > 13/22] = support unchanged → stop.
    w = torch.tensor([0.2, 1.0, 3.0])
    v = torch.tensor([1.0, 100.0, 1.0])
    a = 13 / 11
    out = lat_ternarize(w, v, eps=1e-12)
    close(out, [0.0, a, a], tol=1e-6)
    # D-weighted error: TWN 0.04 + 10·1 + 1 = 11.04; LAT 0.04 + 10·(2/11)² + (20/11)² = 3.6764
    assert weighted_error(w, twn_ternarize(w), v, 1e-12) == pytest.approx(11.04, abs=1e-5)
    assert weighted_error(w, out, v, 1e-12) == pytest.approx(0.04 + 10 * (2 / 11) ** 2 + (20 / 11) ** 2, abs=1e-5)


def test_lat_result_is_a_fixed_point():
    # at convergence α = Σ D·|w|·|b| / Σ D·|b| and b = sign(w)·[|w| > α/2] hold together
    torch.manual_seed(1)
    w = torch.randn(40, 30)
    v = torch.rand(40, 30) ** 4
    for granularity in ("layer", "row"):
        p = lat_parts(w, v, granularity, iters=100)
        d = v.sqrt() + 1e-6
        dims = None if granularity == "layer" else (1,)
        mask = p.codes.abs()
        if dims is None:
            alpha = (d * w.abs() * mask).sum() / (d * mask).sum()
        else:
            alpha = (d * w.abs() * mask).sum(1, keepdim=True) / (d * mask).sum(1, keepdim=True)
        close(p.scale, alpha, tol=1e-5)
        assert torch.equal(p.codes, torch.sign(w) * (w.abs() > alpha / 2))


@pytest.mark.parametrize("granularity", ["layer", "row"])
def test_lat_beats_twn_on_nonuniform_d(granularity):
    # columns 0..23 hold small weights with a large curvature D, columns 24..47 large weights with D ≈ 1:
    # TWN fits α to the large half, LAT trades it for the half that D says matters
    torch.manual_seed(0)
    w = torch.cat([0.1 * torch.randn(64, 24), torch.randn(64, 24)], dim=1)
    v = torch.cat([torch.full((64, 24), 1e4), torch.ones(64, 24)], dim=1) * torch.rand(64, 48)
    twn = twn_ternarize(w, granularity=granularity)
    lat = lat_ternarize(w, v, granularity=granularity)
    assert weighted_error(w, lat, v) < 0.9 * weighted_error(w, twn, v)  # 0.86 (layer), 0.81 (row)
    rows = [lat] if granularity == "layer" else list(lat)
    assert all(r.unique().numel() <= 3 for r in rows)


def test_lat_without_second_moment_is_twn():
    assert torch.equal(lat_ternarize(W, None), twn_ternarize(W))
    assert torch.equal(lat_ternarize(W, None, granularity="row", clip=0.4),
                       twn_ternarize(W, granularity="row", clip=0.4))
