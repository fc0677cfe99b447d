"""How far a student's attention map strays from the teacher's in *ranking*: cover length and ranking loss.

Both metrics compare one query row at a time. Shapes: maps are (B, H, S, S) = (batch, heads, query, key);
``attention_mask`` is (B, S) with 1 for real tokens. Padding is excluded the same way in both: a padded
query row gives NaN (so it never enters a mean), and inside a row padded keys are neither candidates nor
counted in the sequence length ``L_b`` (the number of real tokens of sequence ``b``).

Ties are broken by key position (lower index ranks first), the same way for teacher and student, so two
identical maps always give identical rankings.
"""

from __future__ import annotations

from typing import Optional

import torch

from .masks import check_maps, valid_tokens


def _descending_ranks(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable descending sort of the last dimension → (order, rank) where rank is 1-based."""
    order = torch.sort(rows, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    positions = torch.arange(1, rows.shape[-1] + 1, device=rows.device).expand_as(order)
    ranks.scatter_(-1, order, positions)
    return order, ranks


def cover_length_ratio(
    teacher_map: torch.Tensor,
    student_map: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    top_k: int = 5,
) -> torch.Tensor:
    """Cover length ratio per query row → (B, H, S), NaN on padded query rows.

    For query row ``i`` of sequence ``b``: let ``T_K`` be the ``K' = min(K, L_b)`` keys with the largest
    teacher attention, and ``rank_S(j)`` the 1-based position of key ``j`` when the student's row is sorted
    in decreasing order (real keys only). The cover length is how far down the student's sorted row one
    must read to have seen all of ``T_K``::

        cover(i) = max_{j ∈ T_K} rank_S(j),      ratio(i) = cover(i) / L_b

    Bounds: ``K'/L_b`` (student ranks the teacher's top-K first, e.g. identical maps) ≤ ratio ≤ 1 (a
    teacher top-K key is the student's least attended real key, e.g. a reversed ranking).
    """
    check_maps(teacher_map, student_map)
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    batch, _, seq_len, _ = teacher_map.shape
    real = valid_tokens(attention_mask, batch, seq_len, teacher_map.device)
    key_ok = real[:, None, None, :]
    neg_inf = torch.tensor(float("-inf"), dtype=torch.float32, device=teacher_map.device)
    teacher = torch.where(key_ok, teacher_map.float(), neg_inf)
    student = torch.where(key_ok, student_map.float(), neg_inf)

    lengths = real.sum(dim=1)  # (B,) = L_b
    k_eff = torch.clamp(lengths, max=top_k)  # (B,)
    k_cols = min(top_k, seq_len)
    teacher_top = torch.sort(teacher, dim=-1, descending=True, stable=True).indices[..., :k_cols]
    _, student_rank = _descending_ranks(student)
    ranks_of_top = torch.gather(student_rank, -1, teacher_top)  # (B, H, S, k_cols)
    in_top = torch.arange(k_cols, device=teacher_map.device)[None, :] < k_eff[:, None]  # (B, k_cols)
    ranks_of_top = torch.where(in_top[:, None, None, :], ranks_of_top, torch.zeros_like(ranks_of_top))
    cover = ranks_of_top.max(dim=-1).values.float()
    ratio = cover / lengths.clamp(min=1)[:, None, None].float()
    return torch.where(real[:, None, :], ratio, torch.full_like(ratio, float("nan")))


def pairwise_ranking_loss(
    teacher_map: torch.Tensor,
    student_map: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    margin: float = 0.0,
    max_elements: int = 1 << 22,
) -> torch.Tensor:
    """Pairwise ranking loss per query row → (B, H, S), NaN on padded query rows.

    For query row ``i`` with teacher row ``t`` and student row ``s``, summed over unordered pairs of real
    keys ``j < k`` whose teacher values differ::

        loss(i) = Σ_{j<k} Φ((s_j − s_k) · sign(t_j − t_k)),     Φ(p) = max(0, margin − p)

    With ``margin = 0`` a pair costs ``|s_j − s_k|`` when the student orders it against the teacher and 0
    otherwise, so identical rankings give 0 and a fully reversed ranking gives ``Σ_{j<k} |s_j − s_k|``, the
    most a row with those student values can cost. Pairs the teacher ties (sign 0) carry no order and are
    skipped. The per-head loss of the paper is the sum of this over a head's rows; reduce as needed.

    ``margin = 0`` is computed by sorting in O(S log S) per row (see :func:`_zero_margin_ranking`); a
    positive margin enumerates the pairs, O(S²) per row, in chunks of at most ``max_elements`` elements.
    """
    check_maps(teacher_map, student_map)
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    batch, _, seq_len, _ = teacher_map.shape
    real = valid_tokens(attention_mask, batch, seq_len, teacher_map.device)
    if margin == 0:
        out = _zero_margin_ranking(teacher_map, student_map, real[:, None, None, :].expand_as(teacher_map))
    else:
        out = _ranking_by_pairs(teacher_map, student_map, real, margin, max_elements)
    out = out.float()
    return torch.where(real[:, None, :], out, torch.full_like(out, float("nan")))


def _ranking_by_pairs(teacher_map, student_map, real, margin: float, max_elements: int) -> torch.Tensor:
    """The definition, pair by pair: (B, H, S)."""
    batch, heads, seq_len, _ = teacher_map.shape
    pair_ok = (real[:, :, None] & real[:, None, :]).triu(diagonal=1)  # (B, S_key, S_key), j < k, both real
    out = torch.empty(batch, heads, seq_len, dtype=torch.float32, device=teacher_map.device)
    rows_per_chunk = max(1, max_elements // max(1, heads * seq_len * seq_len))
    for b in range(batch):
        for start in range(0, seq_len, rows_per_chunk):
            stop = min(seq_len, start + rows_per_chunk)
            t = teacher_map[b, :, start:stop].float()  # (H, R, S)
            s = student_map[b, :, start:stop].float()
            t_sign = torch.sign(t[..., :, None] - t[..., None, :])  # (H, R, S, S)
            cost = torch.clamp(margin - (s[..., :, None] - s[..., None, :]) * t_sign, min=0.0)
            keep = pair_ok[b][None, None] & (t_sign != 0)
            out[b, :, start:stop] = (cost * keep).sum(dim=(-1, -2))
    return out


def _pair_weights(rank: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """For ascending values x_1 ≤ … ≤ x_n: Σ_{a<b} (x_b − x_a) = Σ_i x_i · (2i − n − 1), i 1-based."""
    return (2 * rank - size - 1).to(torch.float64)


def _zero_margin_ranking(t: torch.Tensor, s: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Ranking loss with margin 0 over the last dimension, by sorting (float64).

    With ``x = (s_j − s_k)·sign(t_j − t_k)`` and ``max(0, −x) = (|x| − x) / 2``, summed over the pairs the
    teacher does not tie::

        loss = ½ · ( Σ_{untied j<k} |s_j − s_k|  −  Σ_j s_j · c_j ),   c_j = #{k: t_k < t_j} − #{k: t_k > t_j}

    (tied pairs have sign 0, so the second sum may run over all pairs). ``Σ |s_j − s_k|`` over all pairs and
    within each group of equal teacher values come from sorted orders with :func:`_pair_weights`. Keys
    where ``valid`` is False take no part.
    """
    t, s = t.double(), s.double()
    size = valid.sum(-1, keepdim=True)
    positions = torch.arange(t.shape[-1], device=t.device).expand_as(t)
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=t.device)

    # all valid pairs: invalid keys sort last and are zeroed
    s_sorted = torch.sort(torch.where(valid, s, inf), dim=-1).values
    inside = positions < size
    all_pairs = (torch.where(inside, s_sorted, 0.0) * _pair_weights(positions + 1, size)).sum(-1)

    # order by teacher value, then student value: groups of tied teacher values are contiguous, each
    # sorted by student value; invalid keys form the last group (t = inf) with s = 0
    s_zero = torch.where(valid, s, 0.0)
    by_s = torch.sort(s_zero, dim=-1, stable=True).indices
    t1, s1 = torch.where(valid, t, inf).gather(-1, by_s), s_zero.gather(-1, by_s)
    by_t = torch.sort(t1, dim=-1, stable=True).indices
    t2, s2 = t1.gather(-1, by_t), s1.gather(-1, by_t)
    new_group = torch.ones_like(t2, dtype=torch.bool)
    new_group[..., 1:] = t2[..., 1:] != t2[..., :-1]
    group_start = torch.cummax(torch.where(new_group, positions, 0), dim=-1).values
    group_id = torch.cumsum(new_group, dim=-1) - 1
    group_size = torch.zeros_like(positions).scatter_add_(-1, group_id, torch.ones_like(positions)).gather(-1, group_id)
    tied_pairs = (s2 * _pair_weights(positions - group_start + 1, group_size)).sum(-1)
    # for a valid key: #{t_k < t_j} = group_start, #{t_k > t_j} = size − group_start − group_size
    signed = (s2 * (2 * group_start + group_size - size).to(torch.float64)).sum(-1)
    return 0.5 * ((all_pairs - tied_pairs) - signed)


def per_head_mean(row_values: torch.Tensor) -> torch.Tensor:
    """Mean over batch and (non-NaN) query rows of a (B, H, S) metric → (H,)."""
    return torch.nanmean(row_values.transpose(0, 1).reshape(row_values.shape[1], -1), dim=1)
