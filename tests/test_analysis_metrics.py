"""Analysis metrics on hand-made tensors: cover length, ranking loss, Hessian, MSE, ranges, SA-GEN/SA-PROP."""

import math

import pytest
import torch

from ds_kdqat.analysis.attention_metrics import _ranking_by_pairs, cover_length_ratio, pairwise_ranking_loss, per_head_mean
from ds_kdqat.analysis.decomposition import sa_gen_distance, sa_prop_distance, sa_prop_vectors
from ds_kdqat.analysis.hessian import hessian_vector_product, top_hessian_eigenvalues
from ds_kdqat.analysis.propagation import layerwise_mse
from ds_kdqat.analysis.ranges import position_range_sums, token_minmax

TEACHER_ROW = [0.1, 0.4, 0.3, 0.2]
STUDENT_ROW = [0.3, 0.25, 0.4, 0.05]


def padded_pair():
    """(1, 1, 5, 5) maps whose sequence has 4 real tokens; padded key/query carry decoy values."""
    teacher = torch.full((1, 1, 5, 5), 0.7)
    student = torch.full((1, 1, 5, 5), 0.9)
    teacher[0, 0, :, :4] = torch.tensor(TEACHER_ROW)
    student[0, 0, :, :4] = torch.tensor(STUDENT_ROW)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    return teacher, student, mask


def random_maps(batch=3, heads=2, seq=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    maps = torch.softmax(torch.randn(batch, heads, seq, seq, generator=g), dim=-1)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    return maps, mask


def test_cover_length_hand_example():
    teacher, student, mask = padded_pair()
    # teacher top-2 = keys {1, 2}; student order 2, 0, 1, 3 → ranks 3 and 1 → cover 3 of L = 4
    ratio = cover_length_ratio(teacher, student, mask, top_k=2)
    torch.testing.assert_close(ratio[0, 0, :4], torch.full((4,), 0.75))
    assert torch.isnan(ratio[0, 0, 4])  # padded query row excluded
    # top-1 = key 1, student rank 3
    torch.testing.assert_close(cover_length_ratio(teacher, student, mask, top_k=1)[0, 0, 0], torch.tensor(0.75))
    # top-3 = keys {1, 2, 3}; key 3 is the student's last → cover 4 / 4
    torch.testing.assert_close(cover_length_ratio(teacher, student, mask, top_k=3)[0, 0, 0], torch.tensor(1.0))


def test_cover_length_identical_is_k_over_length_and_reversed_is_one():
    maps, mask = random_maps()
    lengths = mask.sum(1).float()  # 6, 4, 2
    ratio = cover_length_ratio(maps * mask[:, None, None, :], maps * mask[:, None, None, :], mask, top_k=3)
    expected = torch.minimum(torch.tensor(3.0), lengths) / lengths  # 0.5, 0.75, 1.0 (K clipped to L)
    for b in range(3):
        real = mask[b].bool()
        torch.testing.assert_close(ratio[b][:, real], torch.full_like(ratio[b][:, real], float(expected[b])))
        assert torch.isnan(ratio[b][:, ~real]).all()
    reversed_ratio = cover_length_ratio(maps, 1.0 - maps, mask, top_k=3)
    assert torch.allclose(per_head_mean(reversed_ratio), torch.ones(2))


def test_ranking_loss_hand_example_and_padding():
    teacher, student, mask = padded_pair()
    # discordant pairs: (0,1) |0.3-0.25|, (0,3) |0.3-0.05|, (1,2) |0.25-0.4| → 0.05 + 0.25 + 0.15
    loss = pairwise_ranking_loss(teacher, student, mask)
    torch.testing.assert_close(loss[0, 0, :4], torch.full((4,), 0.45))
    assert torch.isnan(loss[0, 0, 4])
    # a margin also charges concordant pairs closer than the margin: (0,2) p=0.1, (1,3) p=0.2, (2,3) p=0.35
    with_margin = pairwise_ranking_loss(teacher, student, mask, margin=0.25)
    expected = (0.25 + 0.05) + 0.15 + (0.25 + 0.25) + (0.25 + 0.15) + 0.05 + 0.0
    torch.testing.assert_close(with_margin[0, 0, 0], torch.tensor(expected))


def test_ranking_loss_identical_zero_reversed_maximum_and_chunking():
    maps, mask = random_maps()
    assert torch.nansum(pairwise_ranking_loss(maps, maps, mask)) == 0
    student = 1.0 - maps
    loss = pairwise_ranking_loss(maps, student, mask)
    # every real pair is discordant → Σ_{j<k} |s_j - s_k| over real keys
    for b in range(3):
        n = int(mask[b].sum())
        s = student[b, :, :n, :n]
        expected = (s[..., :, None] - s[..., None, :]).abs().sum(dim=(-1, -2)) / 2
        torch.testing.assert_close(loss[b, :, :n], expected)


def test_sorted_ranking_loss_equals_the_pairwise_definition():
    maps, mask = random_maps(batch=3, heads=2, seq=9, seed=3)
    g = torch.Generator().manual_seed(4)
    student = torch.softmax(torch.randn(maps.shape, generator=g), dim=-1)
    # teacher ties (quantized values) and student ties, inside and across rows
    teacher = torch.round(maps * 20) / 20
    student[0, 0, 0, :4] = 0.05
    real = mask.bool()
    fast = pairwise_ranking_loss(teacher, student, mask)
    by_pairs = _ranking_by_pairs(teacher, student, real, 0.0, max_elements=50)  # 50 → one row per chunk
    expected = torch.where(real[:, None, :], by_pairs, torch.full_like(by_pairs, float("nan")))
    torch.testing.assert_close(fast, expected, equal_nan=True, rtol=1e-5, atol=1e-6)
    assert (fast[~torch.isnan(fast)] > 0).any()


def test_ranking_loss_skips_teacher_ties():
    teacher = torch.tensor([0.5, 0.5, 0.0]).expand(1, 1, 3, 3).clone()
    student = torch.tensor([0.1, 0.6, 0.3]).expand(1, 1, 3, 3).clone()
    # tie (0,1) skipped even with a margin; (0,2) p=(0.1-0.3)*1=-0.2 → 0.2+m; (1,2) p=0.3 → max(0, m-0.3)
    loss = pairwise_ranking_loss(teacher, student, margin=0.1)
    torch.testing.assert_close(loss[0, 0], torch.full((3,), 0.3))
    # margin 0 (sorted path): only (0,2) is discordant, cost |0.1 - 0.3|; the tied pair (0,1) is free
    torch.testing.assert_close(pairwise_ranking_loss(teacher, student)[0, 0], torch.full((3,), 0.2))


def test_metric_shape_errors():
    maps, _ = random_maps()
    with pytest.raises(ValueError, match="differ in shape"):
        cover_length_ratio(maps, maps[:, :1])
    with pytest.raises(ValueError, match="attention_mask has shape"):
        pairwise_ranking_loss(maps, maps, torch.ones(3, 5))
    with pytest.raises(ValueError, match="top_k"):
        cover_length_ratio(maps, maps, top_k=0)
    with pytest.raises(ValueError, match="margin"):
        pairwise_ranking_loss(maps, maps, margin=-0.1)


def quadratic(eigenvalues, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T
    # the parameter vector is split over two tensors, as model parameters are
    x1 = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(len(eigenvalues) - 2, generator=g, dtype=torch.float64, requires_grad=True)

    def loss():
        x = torch.cat([x1, x2])
        return 0.5 * x @ a @ x

    return a, q, [x1, x2], loss


def test_hessian_vector_product_is_a_times_v():
    a, _, params, loss = quadratic([4.0, 2.0, 1.0, -1.0, 0.5])
    v = torch.arange(5, dtype=torch.float64)
    hv = hessian_vector_product([loss, loss], params, [v[:2], v[2:]])
    torch.testing.assert_close(torch.cat(hv), a @ v)


def test_power_iteration_finds_top_eigenvalues_with_deflation():
    eigenvalues = [6.0, 3.0, 1.0, -2.0, 0.5, 0.25]
    _, q, params, loss = quadratic(eigenvalues)
    g = torch.Generator().manual_seed(1)
    result = top_hessian_eigenvalues(loss, params, k=3, max_iter=1000, tol=1e-10, generator=g)
    assert result.values == pytest.approx([6.0, 3.0, -2.0], abs=1e-5)  # largest in magnitude first
    assert all(result.converged)
    for vector, column in zip(result.vectors, [0, 1, 3]):
        cosine = torch.dot(torch.cat(vector), q[:, column]).abs()
        assert cosine == pytest.approx(1.0, abs=1e-4)


def test_power_iteration_of_linear_loss_is_zero():
    x = torch.ones(3, requires_grad=True)
    result = top_hessian_eigenvalues(lambda: (2 * x).sum(), [x], k=1, generator=torch.Generator().manual_seed(0))
    assert result.values == [0.0]


def test_layerwise_mse_excludes_padding():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    teacher = [torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)]
    student = [torch.ones(2, 3, 4), torch.full((2, 3, 4), 2.0)]
    for s in student:
        s[1, 2] = 1e6  # padding garbage
    torch.testing.assert_close(layerwise_mse(teacher, student, mask), torch.tensor([1.0, 4.0]))
    torch.testing.assert_close(layerwise_mse(teacher, student)[0], torch.tensor((5 * 4 + 4 * 1e12) / 24))


def test_token_minmax_excludes_padding():
    hidden = torch.tensor([[[1.0, -2.0, 3.0], [0.5, 0.0, -0.5]], [[-1.0, 4.0, 2.0], [1e6, -1e6, 0.0]]])
    mask = torch.tensor([[1, 1], [1, 0]])
    low, high = token_minmax(hidden, mask)
    torch.testing.assert_close(low[:, 0], torch.tensor([-2.0, -1.0]))
    torch.testing.assert_close(high[:, 0], torch.tensor([3.0, 4.0]))
    assert torch.isnan(low[1, 1]) and torch.isnan(high[1, 1])
    low_sum, high_sum, count = position_range_sums(hidden, mask)
    torch.testing.assert_close(low_sum / count, torch.tensor([-1.5, -0.5]))
    torch.testing.assert_close(high_sum / count, torch.tensor([3.5, 0.5]))
    torch.testing.assert_close(count, torch.tensor([2.0, 1.0]))


def test_sa_prop_vectors_hand_example_and_sum_to_mha():
    values = torch.tensor([[[1.0, 2.0], [3.0, -1.0]]])  # (B=1, S=2, D=2), heads of width 1
    weight = torch.tensor([[1.0, 0.0], [2.0, 1.0]])  # Linear.weight (out, in): head 0 → column 0
    f = sa_prop_vectors(values, weight, num_heads=2)
    expected = torch.tensor([[[[1.0, 2.0], [3.0, 6.0]], [[0.0, 2.0], [0.0, -1.0]]]])  # (1, H, S, D)
    torch.testing.assert_close(f, expected)
    # Σ_h Σ_j α_ij f_h(x_j) equals concat(α·V_h)·W_Oᵀ
    g = torch.Generator().manual_seed(0)
    values = torch.randn(2, 5, 8, generator=g)
    weight = torch.randn(6, 8, generator=g)
    alpha = torch.softmax(torch.randn(2, 4, 5, 5, generator=g), dim=-1)
    f = sa_prop_vectors(values, weight, num_heads=4)
    decomposed = torch.einsum("bhij,bhjd->bid", alpha, f)
    context = torch.matmul(alpha, values.view(2, 5, 4, 2).transpose(1, 2)).transpose(1, 2).reshape(2, 5, 8)
    torch.testing.assert_close(decomposed, context @ weight.T)


def test_sa_prop_distance_hand_example():
    weight = torch.tensor([[1.0, 0.0], [2.0, 1.0]])
    teacher_f = sa_prop_vectors(torch.tensor([[[1.0, 2.0], [3.0, -1.0]]]), weight, 2)
    student_f = sa_prop_vectors(torch.tensor([[[1.0, 2.0], [0.0, -1.0]]]), weight, 2)
    # only f_0(x_1) moves: [3, 6] → [0, 0], distance √45, averaged over 2 tokens
    torch.testing.assert_close(sa_prop_distance(teacher_f, student_f), torch.tensor([math.sqrt(45) / 2, 0.0]))
    only_second = torch.tensor([[0, 1]])
    torch.testing.assert_close(
        sa_prop_distance(teacher_f, student_f, token_mask=only_second), torch.tensor([math.sqrt(45), 0.0])
    )
    # a padded token is not counted even when selected
    torch.testing.assert_close(
        sa_prop_distance(teacher_f, student_f, attention_mask=torch.tensor([[1, 0]])), torch.tensor([0.0, 0.0])
    )


def test_sa_gen_distance_hand_example_excludes_padding():
    teacher = torch.tensor([[[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.3, 0.3, 0.4]]]])
    student = torch.tensor([[[[0.8, 0.2, 0.9], [1.0, 0.0, 0.9], [0.0, 0.0, 1.0]]]])
    mask = torch.tensor([[1, 1, 0]])  # key 2 and query 2 are padding: their decoys must not count
    # row 0: ‖(0.3, −0.3)‖ = 0.3√2, row 1: 0 → mean 0.15√2
    torch.testing.assert_close(sa_gen_distance(teacher, student, mask), torch.tensor([0.15 * math.sqrt(2)]))
    torch.testing.assert_close(
        sa_gen_distance(teacher, student, mask, token_mask=torch.tensor([[0, 1, 1]])), torch.tensor([0.0])
    )
