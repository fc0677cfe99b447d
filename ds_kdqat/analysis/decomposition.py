"""Norm-based decomposition of multi-head attention into SA-GEN and SA-PROP, and their distance from the teacher.

Per head ``h`` and query token ``i``, the MHA output (without the output bias ``b_O``) is a weighted sum::

    MHA(X)(i) = Σ_h Σ_j α^h_{i,j} · f_h(x_j),      f_h(x) = (x·W_V + b_V)[h] · W_O[h]

where ``(·)[h]`` is head ``h``'s ``d_h`` slice of the value vector and ``W_O[h]`` the matching ``d_h`` rows
of the output projection (``x·W`` convention, i.e. columns ``h·d_h … (h+1)·d_h − 1`` of a torch
``Linear.weight``). SA-GEN is the attention map ``α`` (how attention is generated); SA-PROP is ``f_h`` (what
each token propagates). The distances from the teacher, per layer and head, are::

    d_GEN(h)  = mean_{b, i ∈ Q} ‖α^{h,S}_{i,:} − α^{h,T}_{i,:}‖₂    (norm over real keys)
    d_PROP(h) = mean_{b, j ∈ Q} ‖f^S_h(x^S_j) − f^T_h(x^T_j)‖₂      (norm over the D output features)

where ``Q`` is the set of real tokens, optionally restricted by a (B, S) ``token_mask`` (e.g. the ``[SEP]``
positions, as in the paper's figure). Each model's ``f`` uses its own weights and its own layer input.
"""

from __future__ import annotations

from typing import Optional

import torch

from .masks import check_maps, valid_tokens


def sa_prop_vectors(value_states: torch.Tensor, output_weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Per-head transformed vectors ``f_h(x_j)`` → (B, H, S, D_out).

    ``value_states`` (B, S, D) is ``x·W_V + b_V`` for every token (all heads concatenated);
    ``output_weight`` is the output projection's ``Linear.weight`` of shape (D_out, D).
    """
    batch, seq_len, width = value_states.shape
    if width % num_heads:
        raise ValueError(f"value width {width} is not divisible by {num_heads} heads")
    if output_weight.shape[1] != width:
        raise ValueError(f"output weight {tuple(output_weight.shape)} does not take {width} inputs")
    head_dim = width // num_heads
    per_head_values = value_states.float().view(batch, seq_len, num_heads, head_dim).transpose(1, 2)
    per_head_weight = output_weight.float().view(output_weight.shape[0], num_heads, head_dim).permute(1, 2, 0)
    return torch.matmul(per_head_values, per_head_weight)  # (B,H,S,dh) @ (H,dh,D_out)


def _selected_tokens(
    attention_mask: Optional[torch.Tensor], token_mask: Optional[torch.Tensor], batch: int, seq_len: int, device
) -> torch.Tensor:
    selected = valid_tokens(attention_mask, batch, seq_len, device)
    if token_mask is not None:
        selected = selected & valid_tokens(token_mask, batch, seq_len, device)
    return selected


def sa_gen_distance_sums(
    teacher_map: torch.Tensor,
    student_map: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    token_mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ over selected query rows of ‖α^S_i − α^T_i‖₂ per head (H,), number of rows summed (scalar))."""
    check_maps(teacher_map, student_map)
    batch, _, seq_len, _ = teacher_map.shape
    real = valid_tokens(attention_mask, batch, seq_len, teacher_map.device)
    rows = _selected_tokens(attention_mask, token_mask, batch, seq_len, teacher_map.device)
    diff = (student_map.float() - teacher_map.float()) * real[:, None, None, :]
    norms = diff.norm(dim=-1)  # (B, H, S)
    return (norms * rows[:, None, :]).sum(dim=(0, 2)), rows.sum().float()


def sa_prop_distance_sums(
    teacher_f: torch.Tensor,
    student_f: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    token_mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ over selected tokens of ‖f^S_h(x_j) − f^T_h(x_j)‖₂ per head (H,), number of tokens summed)."""
    if teacher_f.shape != student_f.shape or teacher_f.dim() != 4:
        raise ValueError(f"need equal (B, H, S, D) tensors, got {tuple(teacher_f.shape)} and {tuple(student_f.shape)}")
    batch, _, seq_len, _ = teacher_f.shape
    rows = _selected_tokens(attention_mask, token_mask, batch, seq_len, teacher_f.device)
    norms = (student_f.float() - teacher_f.float()).norm(dim=-1)
    return (norms * rows[:, None, :]).sum(dim=(0, 2)), rows.sum().float()


def sa_gen_distance(teacher_map, student_map, attention_mask=None, token_mask=None) -> torch.Tensor:
    """Mean SA-GEN distance per head → (H,); see the module docstring."""
    total, count = sa_gen_distance_sums(teacher_map, student_map, attention_mask, token_mask)
    return total / count


def sa_prop_distance(teacher_f, student_f, attention_mask=None, token_mask=None) -> torch.Tensor:
    """Mean SA-PROP distance per head → (H,); see the module docstring."""
    total, count = sa_prop_distance_sums(teacher_f, student_f, attention_mask, token_mask)
    return total / count
