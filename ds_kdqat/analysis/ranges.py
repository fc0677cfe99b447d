"""Per-token dynamic range of the attention output ``Y_l = LayerNorm(X_l + MHA(X_l))``.

For each token, the minimum and maximum of ``Y_l`` over the hidden features. Padded tokens are excluded:
their min and max are NaN, and the per-position profile averages only over sequences in which that
position is a real token.
"""

from __future__ import annotations

from typing import Optional

import torch

from .masks import valid_tokens


def token_minmax(hidden: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``hidden`` (B, S, D) → (min over D, max over D), each (B, S), NaN at padded positions."""
    if hidden.dim() != 3:
        raise ValueError(f"need a (B, S, D) tensor, got {tuple(hidden.shape)}")
    real = valid_tokens(attention_mask, hidden.shape[0], hidden.shape[1], hidden.device)
    nan = torch.tensor(float("nan"), device=hidden.device)
    low = torch.where(real, hidden.float().amin(dim=-1), nan)
    high = torch.where(real, hidden.float().amax(dim=-1), nan)
    return low, high


def position_range_sums(
    hidden: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per position ``i``: (Σ_b min, Σ_b max, number of sequences where ``i`` is real), each (S,).

    Dividing the sums by the count gives the mean min–max curve over a data split (accumulate first).
    """
    low, high = token_minmax(hidden, attention_mask)
    real = ~torch.isnan(low)
    return torch.nansum(low, dim=0), torch.nansum(high, dim=0), real.sum(dim=0).float()
