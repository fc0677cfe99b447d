"""Knowledge-distillation losses over encoder taps (pure tensor functions; the terms that configs name, and
which tap each loss reads, are registered in :mod:`ds_kdqat.distill.terms`).

Notation: B batch, S sequence, H heads, D features, C classes; ``attention_mask`` is (B, S) with 1/True for
a real token and 0/False for padding. Each function returns a scalar tensor.

How padding is treated (padding never counts):

* token tensors (B, S, D) (``hidden_mse`` and its aliases): the squared error is summed over the valid
  tokens and all D features and divided by ``n_valid_tokens · D``, i.e. the mean over the elements of real
  tokens; longer sequences therefore weigh more, as in an unpadded batch.
* contexts (B, H, S, D_h) (``context_mse``): the same, with the elements of a token being its H·D_h values.
* attention scores (B, H, S, S) (``attention_score_mse``): the mean over the entries whose query *and* key
  are both real tokens (padded keys carry the additive -inf-like mask, padded queries are not outputs).
* attention maps (``attention_map_kl``): for each real query row, KL(teacher ‖ student) over the real keys;
  the mean over the real rows of a sequence, then the mean over heads and over the sequences that have at
  least one real token (every sequence weighs the same).
* logits: (B, C) have no padding; for token-level logits (B, S, C) pass ``attention_mask`` and the mean is
  over real tokens instead of over the batch.

Precision: the functions compute in their inputs' dtype; the objectives (:mod:`ds_kdqat.distill.recipes`,
the supervised ones in :mod:`ds_kdqat.distill.phases`) give them float32 tensors
(:mod:`ds_kdqat.distill.precision`), so the losses of a bf16/fp16 run are computed in fp32.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _token_mask(attention_mask: Tensor, like: Tensor) -> Tensor:
    return attention_mask.to(dtype=like.dtype, device=like.device)


def _check_same_shape(student: Tensor, teacher: Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"{what}: student shape {tuple(student.shape)} != teacher shape {tuple(teacher.shape)}")


def hidden_mse(student: Tensor, teacher: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean squared error over the elements of real tokens.

    ``student``, ``teacher``: (B, S, D); ``attention_mask``: (B, S).
    loss = Σ_{b,s,d} m_bs (x^S_bsd − x^T_bsd)² / (D · Σ_{b,s} m_bs)
    """
    _check_same_shape(student, teacher, "hidden_mse")
    mask = _token_mask(attention_mask, student)
    squared = (student - teacher).pow(2).sum(-1)  # (B, S)
    return (squared * mask).sum() / (mask.sum().clamp_min(1) * student.shape[-1])


def layer_output_mse(student: Tensor, teacher: Tensor, attention_mask: Tensor) -> Tensor:
    """:func:`hidden_mse` on layer outputs ``X_l`` (B, S, D)."""
    return hidden_mse(student, teacher, attention_mask)


def attention_output_mse(student: Tensor, teacher: Tensor, attention_mask: Tensor) -> Tensor:
    """:func:`hidden_mse` on attention outputs ``Y_l = LayerNorm(X_l + MHA(X_l))`` (B, S, D)."""
    return hidden_mse(student, teacher, attention_mask)


def mha_output_mse(student: Tensor, teacher: Tensor, attention_mask: Tensor) -> Tensor:
    """:func:`hidden_mse` on MHA outputs ``Concat(context)·W_O + b_O`` (B, S, D)."""
    return hidden_mse(student, teacher, attention_mask)


def context_mse(student: Tensor, teacher: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean squared error over the context elements of real query tokens.

    ``student``, ``teacher``: (B, H, S, D_h); loss = Σ m_bs (c^S_bhsd − c^T_bhsd)² / (H · D_h · Σ m_bs)
    """
    _check_same_shape(student, teacher, "context_mse")
    heads, head_dim = student.shape[1], student.shape[-1]
    mask = _token_mask(attention_mask, student)
    squared = (student - teacher).pow(2).sum(dim=(1, 3))  # (B, S)
    return (squared * mask).sum() / (mask.sum().clamp_min(1) * heads * head_dim)


def _pair_mask(attention_mask: Tensor, like: Tensor) -> Tensor:
    """(B, 1, S, S) mask of (query, key) pairs that are both real tokens."""
    mask = _token_mask(attention_mask, like)
    return (mask[:, None, :, None] * mask[:, None, None, :])


def attention_score_mse(student_scores: Tensor, teacher_scores: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean squared error over the score entries whose query and key are real tokens.

    ``student_scores``, ``teacher_scores``: (B, H, S, S) pre-softmax scores; with P = Σ_b n_b² pairs,
    loss = Σ_{b,h,i,j} m_bi m_bj (a^S − a^T)² / (H · P)
    """
    _check_same_shape(student_scores, teacher_scores, "attention_score_mse")
    pairs = _pair_mask(attention_mask, student_scores)
    # padded entries hold ~-3.4e38; zero them before squaring so no inf/nan reaches the sum or the gradient
    # (in place on the fresh difference: one (B, H, S, S) temporary fewer)
    diff = student_scores - teacher_scores
    diff.masked_fill_(~pairs.bool(), 0.0)
    return (diff * diff).sum() / (pairs.sum().clamp_min(1) * student_scores.shape[1])


def _masked_log_softmax(logits: Tensor, key_mask: Tensor) -> Tensor:
    """log_softmax over the last dim restricted to ``key_mask`` (entries outside get -inf)."""
    return torch.log_softmax(logits.masked_fill(~key_mask, float("-inf")), dim=-1)


def attention_map_kl(
    student_map: Tensor, teacher_map: Tensor, attention_mask: Tensor, temperature: float = 1.0
) -> Tensor:
    """KL(teacher ‖ student) per real query row over the real keys; mean over rows, then heads and batch.

    ``student_map``, ``teacher_map``: (B, H, S, S) attention maps (rows sum to one over real keys).
    With temperature τ ≠ 1 each row is re-tempered over the real keys, p ↦ p^(1/τ) / Σ_j p_j^(1/τ)
    (= softmax(score/τ)); τ = 1 uses the student's map as it is and the teacher's renormalised over the real
    keys, t ↦ t / Σ_{j real} t_j (the masked softmax makes each row sum to one over the real keys, with 0 at
    padded keys, up to the rounding of the map's dtype: bf16 maps are off by up to ~2^-8, which would bias the KL
    at first order). No τ² factor is applied. The teacher map is a target:
    no gradient flows into it.
    KL_bhi = Σ_{j real} t_bhij (log t_bhij − log s_bhij); probabilities are floored at the smallest normal
    float before the log, so an underflowed entry gives a large but finite term (never inf/nan).
    loss = mean_{b with n_b>0} mean_h (1/n_b) Σ_{i real} KL_bhi
    """
    _check_same_shape(student_map, teacher_map, "attention_map_kl")
    if temperature <= 0:
        raise ValueError(f"attention_map_kl: temperature must be > 0, got {temperature}")
    tokens = attention_mask.to(device=student_map.device).bool()  # (B, S)
    # a sequence without any real token keeps all keys so its (excluded) rows stay finite
    keys = tokens | ~tokens.any(-1, keepdim=True)
    key_mask = keys[:, None, None, :]  # (B, 1, 1, S)
    tiny = torch.finfo(student_map.dtype).tiny
    if temperature == 1.0:
        # maps from the masked softmax sum to one over the real keys and are 0 at padded keys: the student's is
        # used as it is; the teacher's row is renormalised over the real keys (teacher mass on padded keys, if
        # any, is dropped), since a map rounded to bf16 sums to one only within ~2^-8 and that remainder would add
        # a first-order bias to the KL (for an fp32 map it changes the value by float rounding only); few
        # (B, H, S, S) temporaries
        with torch.no_grad():
            teacher = teacher_map * key_mask
            teacher = teacher / teacher.sum(-1, keepdim=True).clamp_min(tiny)
            log_teacher = torch.log(teacher.clamp_min(tiny))
        terms = teacher * (log_teacher - torch.log(student_map.clamp_min(tiny)))
    else:
        log_student = _masked_log_softmax(torch.log(student_map.clamp_min(tiny)) / temperature, key_mask)
        log_teacher = _masked_log_softmax(torch.log(teacher_map.clamp_min(tiny)) / temperature, key_mask)
        # padded keys: -inf log-probs become 0 so neither the value nor any gradient picks up a nan
        log_student = log_student.masked_fill(~key_mask, 0.0)
        log_teacher = log_teacher.masked_fill(~key_mask, 0.0)
        terms = (log_teacher.exp() * (log_teacher - log_student)).masked_fill(~key_mask, 0.0)
    row_kl = terms.sum(-1)  # (B, H, S)
    query = tokens[:, None, :].to(row_kl.dtype)  # (B, 1, S)
    valid_rows = query.sum(-1)  # (B, 1)
    per_head = (row_kl * query).sum(-1) / valid_rows.clamp_min(1)  # (B, H)
    has_tokens = (valid_rows.squeeze(-1) > 0).to(row_kl.dtype)  # (B,)
    return (per_head.mean(-1) * has_tokens).sum() / has_tokens.sum().clamp_min(1)


def _per_example_mean(values: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
    """Mean of ``values`` ((B,) or (B, S)); over real tokens when (B, S) and a mask is given."""
    if values.dim() == 1 or attention_mask is None:
        return values.mean()
    mask = _token_mask(attention_mask, values)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def soft_cross_entropy(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
    attention_mask: Optional[Tensor] = None,
) -> Tensor:
    """Mean over the batch of −Σ_c softmax(t/τ)_c · log_softmax(s/τ)_c (no τ² factor).

    Logits (B, C), or (B, S, C) for token-level heads, then averaged over real tokens of ``attention_mask``.
    """
    _check_same_shape(student_logits, teacher_logits, "soft_cross_entropy")
    if temperature <= 0:
        raise ValueError(f"soft_cross_entropy: temperature must be > 0, got {temperature}")
    target = torch.softmax(teacher_logits / temperature, dim=-1)
    per_example = -(target * torch.log_softmax(student_logits / temperature, dim=-1)).sum(-1)
    return _per_example_mean(per_example, attention_mask)


def logits_mse(student_logits: Tensor, teacher_logits: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
    """Mean over the batch (or real tokens) of the mean squared logit difference; regression KD.

    Logits (B, C) (C = 1 for regression) or (B, S, C).
    """
    _check_same_shape(student_logits, teacher_logits, "logits_mse")
    per_example = (student_logits - teacher_logits).pow(2).mean(-1)
    return _per_example_mean(per_example, attention_mask)


def ground_truth_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of ``logits`` (B, C) against class indices ``labels`` (B,).

    Labels equal to -100 are ignored (HF's convention); token-level (B, S, C) logits are flattened.
    """
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long(), ignore_index=-100)


def ground_truth_mse(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean squared error of regression ``logits`` (B, 1) or (B,) against float ``labels`` (B,)."""
    prediction = logits.squeeze(-1) if logits.dim() == labels.dim() + 1 else logits
    _check_same_shape(prediction, labels, "ground_truth_mse")
    return (prediction - labels.to(prediction.dtype)).pow(2).mean()


def _mask_padding(logits: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
    """``logits`` (B, S) with padded positions at the most negative finite value (softmax weight 0)."""
    if attention_mask is None:
        return logits
    keep = attention_mask.to(device=logits.device).bool()
    return logits.masked_fill(~keep, torch.finfo(logits.dtype).min)


def span_soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
                            attention_mask: Optional[Tensor] = None) -> Tensor:
    """Soft cross-entropy of extractive-QA span logits, the mean of the start and the end term.

    Logits (B, S, 2) (``[..., 0]`` start, ``[..., 1]`` end). For each of the two, the distributions are over
    the positions of a sequence (padded positions of ``attention_mask`` left out):
    CE_b = −Σ_s softmax(t_b/τ)_s · log_softmax(s_b/τ)_s, averaged over the batch; loss = (CE_start + CE_end)/2.
    No τ² factor.
    """
    _check_same_shape(student_logits, teacher_logits, "span_soft_cross_entropy")
    if student_logits.dim() != 3 or student_logits.shape[-1] != 2:
        raise ValueError(f"span_soft_cross_entropy: expected (B, S, 2) logits, got {tuple(student_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"span_soft_cross_entropy: temperature must be > 0, got {temperature}")
    total = 0.0
    for k in (0, 1):
        student = _mask_padding(student_logits[..., k] / temperature, attention_mask)
        teacher = _mask_padding(teacher_logits[..., k] / temperature, attention_mask)
        target = torch.softmax(teacher, dim=-1)
        product = target * torch.log_softmax(student, dim=-1)
        if attention_mask is not None:
            product = product.masked_fill(~attention_mask.to(device=product.device).bool(), 0.0)
        total = total + (-product.sum(-1)).mean()
    return total / 2


def span_cross_entropy(logits: Tensor, positions: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
    """Supervised extractive-QA loss: the mean of the cross-entropies of the start logits against the start
    positions and of the end logits against the end positions.

    ``logits`` (B, S, 2); ``positions`` (B, 2) token indices (start, end), -100 ignored; padded positions of
    ``attention_mask`` are no candidates.
    """
    if logits.dim() != 3 or logits.shape[-1] != 2 or positions.shape != (logits.shape[0], 2):
        raise ValueError(f"span_cross_entropy: expected (B, S, 2) logits and (B, 2) positions, got "
                         f"{tuple(logits.shape)} and {tuple(positions.shape)}")
    losses = [F.cross_entropy(_mask_padding(logits[..., k], attention_mask), positions[:, k].long(),
                              ignore_index=-100) for k in (0, 1)]
    return (losses[0] + losses[1]) / 2
