"""A BERT-style masked-LM head fitted on a frozen encoder (for encoders shipped without one).

Head, for encoder output ``h`` (…, H) and the encoder's word-embedding matrix ``E`` (V × H):

    t      = LayerNorm(GELU(h · Wᵀ + b))           W: H × H
    logits = t · Eᵀ + β                            β: V (output bias); decoder weight tied to E (frozen)

Files: ``<name>.safetensors`` (``transform.dense.weight/bias``, ``transform.layer_norm.weight/bias``,
``bias``) and ``<name>.json`` beside it (sizes, activation, encoder it was fitted on, fit figures).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ds_kdqat.errors import ConfigError, DataError

from ds_kdqat.fileio import atomic_write_json, atomic_write_via

HEAD_FORMAT = "ds-kdqat-mlm-head"
HEAD_FORMAT_VERSION = 1
ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh")}


class MLMHead(nn.Module):
    """Transform + LayerNorm + output bias; the decoder is the (frozen, tied) embedding passed at call time."""

    def __init__(self, hidden_size: int, vocab_size: int, layer_norm_eps: float = 1e-12, hidden_act: str = "gelu"):
        super().__init__()
        if hidden_act not in ACTIVATIONS:
            raise ConfigError("mlm_head.hidden_act", f"got {hidden_act!r}; allowed: {', '.join(ACTIVATIONS)}")
        self.hidden_act = hidden_act
        self.transform = nn.ModuleDict(
            {"dense": nn.Linear(hidden_size, hidden_size), "layer_norm": nn.LayerNorm(hidden_size, eps=layer_norm_eps)}
        )
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        nn.init.normal_(self.transform["dense"].weight, std=0.02)
        nn.init.zeros_(self.transform["dense"].bias)

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        """hidden (…, H), word_embeddings (V, H) → logits (…, V)."""
        t = ACTIVATIONS[self.hidden_act](self.transform["dense"](hidden))
        t = self.transform["layer_norm"](t)
        return t @ word_embeddings.T + self.bias


def mask_tokens(
    input_ids: torch.Tensor,
    maskable: torch.Tensor,
    mask_token_id: int,
    random_token_ids: torch.Tensor,
    generator: torch.Generator,
    rate: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking rule on a batch.

    input_ids (B, T) long; maskable (B, T) bool (real, non-special tokens). Each maskable token is selected
    with probability ``rate`` (a sequence with none selected gets one, chosen uniformly); a selected token
    becomes ``[MASK]`` with probability 0.8, a uniformly drawn id from ``random_token_ids`` with 0.1, and
    stays with 0.1. Returns (masked_ids (B, T), selected (B, T) bool); targets are ``input_ids[selected]``.
    """
    u = torch.rand(input_ids.shape, generator=generator)
    selected = (u < rate) & maskable
    # at least one selection per sequence that has a maskable token
    none = ~selected.any(dim=1) & maskable.any(dim=1)
    if none.any():
        scores = torch.rand(input_ids.shape, generator=generator).masked_fill(~maskable, -1.0)
        pick = scores.argmax(dim=1)
        rows = none.nonzero().squeeze(1)
        selected[rows, pick[rows]] = True
    kind = torch.rand(input_ids.shape, generator=generator)
    masked = input_ids.clone()
    to_mask = selected & (kind < 0.8)
    to_random = selected & (kind >= 0.8) & (kind < 0.9)
    masked[to_mask] = mask_token_id
    draws = torch.randint(len(random_token_ids), (int(to_random.sum()),), generator=generator)
    masked[to_random] = random_token_ids[draws]
    return masked, selected


def save_head(head: MLMHead, path: str, meta: dict) -> tuple[str, str]:
    """Write ``path`` (safetensors; ``.safetensors`` appended if missing) and its ``.json``, each atomically."""
    from safetensors.torch import save_file

    weights = Path(path if path.endswith(".safetensors") else path + ".safetensors")
    info = {
        "format": HEAD_FORMAT,
        "version": HEAD_FORMAT_VERSION,
        "hidden_size": head.transform["dense"].in_features,
        "vocab_size": head.bias.numel(),
        "layer_norm_eps": head.transform["layer_norm"].eps,
        "hidden_act": head.hidden_act,
        **meta,
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    atomic_write_via(weights, lambda tmp: save_file(tensors, tmp, metadata={"format": HEAD_FORMAT}))
    meta_file = weights.with_suffix(".json")
    atomic_write_json(meta_file, info)
    return str(weights), str(meta_file)


def load_head(path: str) -> tuple[MLMHead, dict]:
    """Read a head written by :func:`save_head` (``path`` = the safetensors file)."""
    from safetensors.torch import load_file

    weights = Path(path)
    meta_file = weights.with_suffix(".json")
    if not weights.is_file():
        raise ConfigError("augment.mlm.head", f"{path} does not exist")
    if not meta_file.is_file():
        raise ConfigError("augment.mlm.head", f"{meta_file} (the head's description) does not exist")
    try:
        info = json.loads(meta_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{meta_file}:{exc.lineno}", f"not valid JSON: {exc.msg}") from exc
    if info.get("format") != HEAD_FORMAT:
        raise DataError(str(meta_file), f"expected format {HEAD_FORMAT!r}, got {info.get('format')!r}")
    head = MLMHead(info["hidden_size"], info["vocab_size"], info["layer_norm_eps"], info["hidden_act"])
    state = load_file(str(weights))
    missing, unexpected = head.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DataError(str(weights), f"tensor names do not match a head (missing {missing}, unexpected {unexpected})")
    return head, info
