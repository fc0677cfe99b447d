"""Every KD loss against values computed by hand on small padded tensors."""

import math

import pytest
import torch

from ds_kdqat.distill import losses
from ds_kdqat.distill.losses import (
    attention_map_kl, attention_output_mse, attention_score_mse, context_mse, ground_truth_cross_entropy,
    ground_truth_mse, hidden_mse, logits_mse, mha_output_mse, soft_cross_entropy,
)

NEG = torch.finfo(torch.float32).min


def test_hidden_mse_counts_only_real_tokens():
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    student = torch.zeros(2, 3, 2)
    teacher = torch.full((2, 3, 2), 100.0)  # padded positions keep 100: they must not count
    teacher[0] = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])  # squares: 1 + 4 + 2 = 7
    teacher[1, 0] = torch.tensor([3.0, 0.0])  # 9
    # 4 real tokens x 2 features = 8 elements; (7 + 9) / 8 = 2
    for fn in (hidden_mse, attention_output_mse, mha_output_mse, losses.layer_output_mse):
        assert fn(student, teacher, mask).item() == pytest.approx(2.0)


def test_hidden_mse_gradient_is_zero_on_padding():
    mask = torch.tensor([[1, 0]])
    student = torch.zeros(1, 2, 1, requires_grad=True)
    hidden_mse(student, torch.ones(1, 2, 1), mask).backward()
    # d/ds (s - 1)^2 / 1 = 2 (s - 1) = -2 at the real token, 0 at the padded one
    assert student.grad.flatten().tolist() == [-2.0, 0.0]


def test_context_mse_by_hand():
    mask = torch.tensor([[1, 1], [1, 0]])
    student = torch.zeros(2, 2, 2, 1)  # (B, H, S, D_h)
    teacher = torch.zeros(2, 2, 2, 1)
    teacher[0, :, :, 0] = torch.tensor([[1.0, 2.0], [3.0, 0.0]])  # 1 + 4 + 9 + 0 = 14
    teacher[1, :, 0, 0] = torch.tensor([1.0, 1.0])  # 2
    teacher[1, :, 1, 0] = 50.0  # padded query
    # 3 real tokens x 2 heads x 1 = 6 elements
    assert context_mse(student, teacher, mask).item() == pytest.approx(16 / 6)


def test_attention_score_mse_by_hand():
    mask = torch.tensor([[1, 1], [1, 0]])
    teacher = torch.zeros(2, 1, 2, 2)
    teacher[1, :, :, 1] = NEG  # padded key carries the additive mask
    student = teacher.clone()
    student[0, 0] += torch.tensor([[1.0, 0.0], [2.0, -1.0]])  # 1 + 0 + 4 + 1 = 6
    student[1, 0, 0, 0] += 3.0  # 9
    student[1, 0, 1, 0] += 7.0  # padded query row: ignored
    student.requires_grad_(True)
    loss = attention_score_mse(student, teacher, mask)
    # pairs with real query and key: 4 + 1 = 5 (x 1 head)
    assert loss.item() == pytest.approx(15 / 5)
    loss.backward()
    assert torch.isfinite(student.grad).all()
    assert student.grad[1, 0, 1, 0] == 0 and student.grad[1, 0, 0, 1] == 0


def _kl(t, s):
    return sum(ti * math.log(ti / si) for ti, si in zip(t, s) if ti > 0)


def test_attention_map_kl_by_hand():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    t0 = [[0.2, 0.3, 0.5], [1 / 3, 1 / 3, 1 / 3], [0.6, 0.2, 0.2]]
    s0 = [[0.3, 0.3, 0.4], [0.5, 0.25, 0.25], [0.2, 0.2, 0.6]]
    t1 = [[0.5, 0.5, 0.0], [0.8, 0.2, 0.0], [0.1, 0.1, 0.8]]  # last row: padded query
    s1 = [[0.25, 0.75, 0.0], [0.5, 0.5, 0.0], [0.7, 0.2, 0.1]]
    teacher = torch.tensor([[t0], [t1]])  # (B=2, H=1, 3, 3)
    student = torch.tensor([[s0], [s1]], requires_grad=True)
    per_seq0 = sum(_kl(t, s) for t, s in zip(t0, s0)) / 3
    per_seq1 = sum(_kl(t[:2], s[:2]) for t, s in zip(t1[:2], s1[:2])) / 2
    expected = (per_seq0 + per_seq1) / 2  # rows, then batch: every sequence weighs the same
    loss = attention_map_kl(student, teacher, mask)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert torch.isfinite(student.grad).all()
    assert student.grad[1, 0, 2].abs().max() == 0  # padded query row gets no gradient


def test_attention_map_kl_heads_and_temperature():
    mask = torch.tensor([[1, 1]])
    teacher = torch.tensor([[[[0.9, 0.1], [0.5, 0.5]], [[0.5, 0.5], [0.5, 0.5]]]])  # (1, 2, 2, 2)
    student = torch.tensor([[[[0.5, 0.5], [0.5, 0.5]], [[0.2, 0.8], [0.5, 0.5]]]])
    head0 = (_kl([0.9, 0.1], [0.5, 0.5]) + 0) / 2
    head1 = (_kl([0.5, 0.5], [0.2, 0.8]) + 0) / 2
    assert attention_map_kl(student, teacher, mask).item() == pytest.approx((head0 + head1) / 2, rel=1e-5)

    def temper(p, tau):  # p^(1/tau), renormalised
        q = [x ** (1 / tau) for x in p]
        return [x / sum(q) for x in q]

    tau = 2.0
    head0 = _kl(temper([0.9, 0.1], tau), [0.5, 0.5]) / 2
    head1 = _kl([0.5, 0.5], temper([0.2, 0.8], tau)) / 2
    value = attention_map_kl(student, teacher, mask, temperature=tau).item()
    assert value == pytest.approx((head0 + head1) / 2, rel=1e-5)


def test_attention_map_kl_is_zero_for_equal_maps_and_finite_on_underflow():
    mask = torch.tensor([[1, 1, 0]])
    teacher = torch.tensor([[[[0.5, 0.5, 0.0], [0.3, 0.7, 0.0], [0.5, 0.5, 0.0]]]])
    assert attention_map_kl(teacher, teacher, mask).abs().item() < 1e-7
    student = torch.tensor([[[[1.0, 0.0, 0.0], [0.3, 0.7, 0.0], [0.5, 0.5, 0.0]]]], requires_grad=True)
    loss = attention_map_kl(student, teacher, mask)
    assert torch.isfinite(loss) and loss.item() > 10  # 0.5 * (log 0.5 - log tiny) / 2 rows ~ 21.6
    loss.backward()
    assert torch.isfinite(student.grad).all()


def test_soft_cross_entropy_by_hand():
    ln3 = math.log(3)
    student = torch.tensor([[0.0, ln3], [0.0, 0.0]])
    teacher = torch.tensor([[0.0, 0.0], [ln3, 0.0]])
    first = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    second = math.log(2)
    assert soft_cross_entropy(student, teacher).item() == pytest.approx((first + second) / 2, rel=1e-6)
    # temperature 2: logits halved
    student = torch.tensor([[0.0, 2 * ln3]])
    teacher = torch.tensor([[2 * ln3, 0.0]])
    expected = -(0.75 * math.log(0.25) + 0.25 * math.log(0.75))
    assert soft_cross_entropy(student, teacher, temperature=2.0).item() == pytest.approx(expected, rel=1e-6)


def test_soft_cross_entropy_token_level_ignores_padding():
    ln3 = math.log(3)
    student = torch.tensor([[[0.0, ln3], [9.0, -9.0]]])  # (B=1, S=2, C=2); token 1 is padding
    teacher = torch.tensor([[[0.0, 0.0], [-9.0, 9.0]]])
    mask = torch.tensor([[1, 0]])
    expected = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert soft_cross_entropy(student, teacher, attention_mask=mask).item() == pytest.approx(expected, rel=1e-6)


def test_logits_mse_and_ground_truth():
    assert logits_mse(torch.tensor([[1.0], [2.0]]), torch.zeros(2, 1)).item() == pytest.approx(2.5)
    logits = torch.tensor([[0.0, math.log(3)], [0.0, math.log(3)]])
    expected = (-math.log(0.75) - math.log(0.25)) / 2
    assert ground_truth_cross_entropy(logits, torch.tensor([1, 0])).item() == pytest.approx(expected, rel=1e-6)
    assert ground_truth_mse(torch.tensor([[1.0], [3.0]]), torch.tensor([0.0, 1.0])).item() == pytest.approx(2.5)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="hidden_mse: student shape"):
        hidden_mse(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), torch.ones(1, 2))


def test_registry_names():
    # the loss functions are registered as the terms configs name (ds_kdqat.distill.terms.TERMS)
    from ds_kdqat.distill.terms import TERMS, TermContext

    assert {"pred", "ground_truth", "layer_output", "attention_score", "attention_map", "attention_output",
            "mha_output", "context"} <= set(TERMS)
    g = torch.Generator().manual_seed(0)
    s = torch.softmax(torch.randn(2, 2, 3, 3, generator=g), -1)
    t = torch.softmax(torch.randn(2, 2, 3, 3, generator=g), -1)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    ctx = TermContext(mask, None, "classification", 1.0, 2.0)
    assert TERMS["attention_map"].tap == "attention_maps" and TERMS["attention_map"].per_layer
    assert torch.equal(TERMS["attention_map"].loss(s, t, ctx), attention_map_kl(s, t, mask, temperature=2.0))
