"""Padding masks and masked means shared by the analysis metrics.

Convention: ``attention_mask`` is the tokenizer's (B, S) mask, 1 (or True) for a real token and 0 for
padding. A metric on an attention map (B, H, S, S) counts a query row ``i`` only if token ``i`` is real, and
inside that row only the real keys ``j``. ``None`` means every position is real.
"""

from __future__ import annotations

from typing import Optional

import torch


def valid_tokens(attention_mask: Optional[torch.Tensor], batch: int, seq_len: int, device=None) -> torch.Tensor:
    """Boolean (B, S) mask of real tokens; all True when ``attention_mask`` is None."""
    if attention_mask is None:
        return torch.ones(batch, seq_len, dtype=torch.bool, device=device)
    if attention_mask.shape != (batch, seq_len):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(batch, seq_len)}")
    return attention_mask.to(device=device).bool()


def check_maps(teacher_map: torch.Tensor, student_map: torch.Tensor) -> None:
    if teacher_map.dim() != 4 or teacher_map.shape[-1] != teacher_map.shape[-2]:
        raise ValueError(f"attention maps must be (B, H, S, S); got {tuple(teacher_map.shape)}")
    if teacher_map.shape != student_map.shape:
        raise ValueError(
            f"teacher map {tuple(teacher_map.shape)} and student map {tuple(student_map.shape)} differ in shape"
        )

