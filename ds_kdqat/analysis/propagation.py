"""Error propagation: layer-wise teacher–student mean squared error of hidden states.

Inputs are per-layer lists of (B, S, D) tensors (e.g. the L+1 layer outputs ``X_0..X_L`` with the embedding
output first, or the L attention outputs ``Y_1..Y_L``) and the (B, S) padding mask. Only real tokens count::

    mse_l = Σ_{b, i real} Σ_d (T_l[b,i,d] − S_l[b,i,d])² / (N_real · D)
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .masks import valid_tokens


def squared_error_sums(
    teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], attention_mask: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer: (sum of squared errors over real tokens and features, number of summed elements), each (L,).

    The two parts let callers accumulate over batches before dividing.
    """
    if len(teacher) != len(student):
        raise ValueError(f"teacher has {len(teacher)} layers, student {len(student)}")
    sums, counts = [], []
    for layer, (t, s) in enumerate(zip(teacher, student)):
        if t.shape != s.shape or t.dim() != 3:
            raise ValueError(f"layer {layer}: need equal (B, S, D) tensors, got {tuple(t.shape)} and {tuple(s.shape)}")
        real = valid_tokens(attention_mask, t.shape[0], t.shape[1], t.device)
        diff = (t.float() - s.float()) ** 2
        sums.append(diff[real].sum())
        counts.append(torch.tensor(float(real.sum()) * t.shape[2], device=t.device))
    return torch.stack(sums), torch.stack(counts)


def layerwise_mse(
    teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], attention_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Masked MSE per layer → (L,) (NaN for a layer with no real token)."""
    sums, counts = squared_error_sums(teacher, student, attention_mask)
    return sums / counts
