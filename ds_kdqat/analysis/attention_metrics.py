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
    max_elements: int = 1 << 24,
) -> torch.Tensor:
    """Pairwise ranking loss per query row → (B, H, S), NaN on padded query rows.

    For query row ``i`` with teacher row ``t`` and student row ``s``, summed over unordered pairs of real
    keys ``j < k`` whose teacher values differ::

        loss(i) = Σ_{j<k} Φ((s_j − s_k) · sign(t_j − t_k)),     Φ(p) = max(0, margin − p)

    With ``margin = 0`` a pair costs ``|s_j − s_k|`` when the student orders it against the teacher and 0
    otherwise, so identical rankings give 0 and a fully reversed ranking gives ``Σ_{j<k} |s_j − s_k|``, the
    most a row with those student values can cost. Pairs the teacher ties (sign 0) carry no order and are
    skipped. The per-head loss of the paper is the sum of this over a head's rows; reduce as needed.

    Computed in chunks of query rows so that no intermediate exceeds ``max_elements`` elements.
    """
    check_maps(teacher_map, student_map)
    batch, heads, seq_len, _ = teacher_map.shape
    real = valid_tokens(attention_mask, batch, seq_len, teacher_map.device)
    pair_ok = (real[:, :, None] & real[:, None, :]).triu(diagonal=1)  # (B, S_key, S_key), j < k, both real
    out = torch.empty(batch, heads, seq_len, dtype=torch.float32, device=teacher_map.device)
    rows_per_chunk = max(1, max_elements // max(1, heads * seq_len * seq_len))
    for b in range(batch):
        for start in range(0, seq_len, rows_per_chunk):
            stop = min(seq_len, start + rows_per_chunk)
            t = teacher_map[b, :, start:stop].float()  # (H, R, S)
            s = student_map[b, :, start:stop].float()
            t_sign = torch.sign(t[..., :, None] - t[..., None, :])  # (H, R, S, S)
            product = (s[..., :, None] - s[..., None, :]) * t_sign
            cost = torch.clamp(margin - product, min=0.0)
            keep = pair_ok[b][None, None] & (t_sign != 0)
            out[b, :, start:stop] = torch.where(keep, cost, torch.zeros_like(cost)).sum(dim=(-1, -2))
    return torch.where(real[:, None, :], out, torch.full_like(out, float("nan")))


def per_head_mean(row_values: torch.Tensor) -> torch.Tensor:
    """Mean over batch and (non-NaN) query rows of a (B, H, S) metric → (H,)."""
    return torch.nanmean(row_values.transpose(0, 1).reshape(row_values.shape[1], -1), dim=1)
