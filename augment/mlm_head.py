"""A BERT-style masked-LM head fitted on an encoder (for encoders shipped without one).

Head, for encoder output ``h`` (…, H) and the encoder's word-embedding matrix ``E`` (V × H):

    t      = LayerNorm(GELU(h · Wᵀ + b))           W: H × H
    logits = t · Eᵀ + β                            β: V (output bias); decoder weight tied to E (frozen)

The head may have been fitted jointly with the top K layers of the encoder (``fit_mlm_head --unfreeze_layers
K``); its logits are then only meaningful on an encoder carrying those tuned layers, so the head file carries
them too, and :func:`apply_tuned_encoder` copies them into the loaded encoder. In memory they travel with the
head as :attr:`MLMHead.encoder_tensors` (name relative to the bare encoder → tensor; empty when nothing was
tuned), so whoever saves the head saves them.

Files (format version 2): ``<name>.safetensors`` holds the head (``transform.dense.weight/bias``,
``transform.layer_norm.weight/bias``, ``bias``) and the tuned encoder tensors under the prefix ``encoder.``
(``encoder.`` + the bare encoder's parameter name, e.g. ``encoder.encoder.layer.5.attention.self.query.weight``);
``<name>.json`` beside it holds sizes, activation, the encoder it was fitted on, ``tuned_layers`` (layer
indices), ``tuned_parameters`` (the tuned parameter names, without the prefix) and the fit's figures.
Version-1 files (head only) still load.
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
HEAD_FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
ENCODER_PREFIX = "encoder."
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
        # tuned encoder parameters fitted with this head (bare-encoder name → tensor); not part of state_dict
        self.encoder_tensors: dict[str, torch.Tensor] = {}
        self.tuned_layers: list[int] = []
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
    """Write ``path`` (safetensors; ``.safetensors`` appended if missing) and its ``.json``, each atomically.

    The head's tuned encoder tensors (:attr:`MLMHead.encoder_tensors`) go into the same file under
    ``encoder.``; the ``.json`` lists them (``tuned_layers``, ``tuned_parameters``) beside ``meta``.
    """
    from safetensors.torch import save_file

    weights = Path(path if path.endswith(".safetensors") else path + ".safetensors")
    described = {
        "format": HEAD_FORMAT,
        "version": HEAD_FORMAT_VERSION,
        "hidden_size": head.transform["dense"].in_features,
        "vocab_size": head.bias.numel(),
        "layer_norm_eps": head.transform["layer_norm"].eps,
        "hidden_act": head.hidden_act,
        "tuned_layers": list(head.tuned_layers),
        "tuned_parameters": sorted(head.encoder_tensors),
    }
    clash = sorted(set(meta) & set(described))
    if clash:
        raise ValueError(f"save_head: meta may not set {clash} (written from the head itself)")
    info = {**described, **meta}
    tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    for name, value in head.encoder_tensors.items():
        tensors[ENCODER_PREFIX + name] = value.detach().cpu().contiguous()
    atomic_write_via(weights, lambda tmp: save_file(tensors, tmp, metadata={"format": HEAD_FORMAT}))
    meta_file = weights.with_suffix(".json")
    atomic_write_json(meta_file, info)
    return str(weights), str(meta_file)


def _read_info(weights: Path) -> dict:
    """The head's ``.json`` beside ``weights``, checked for format and version."""
    meta_file = weights.with_suffix(".json")
    if not weights.is_file():
        raise ConfigError("augment.mlm.head", f"{weights} does not exist")
    if not meta_file.is_file():
        raise ConfigError("augment.mlm.head", f"{meta_file} (the head's description) does not exist")
    try:
        info = json.loads(meta_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{meta_file}:{exc.lineno}", f"not valid JSON: {exc.msg}") from exc
    if info.get("format") != HEAD_FORMAT:
        raise DataError(str(meta_file), f"expected format {HEAD_FORMAT!r}, got {info.get('format')!r}")
    if info.get("version", 1) not in READABLE_VERSIONS:
        raise DataError(
            str(meta_file), f"format version {info.get('version')!r}; this code reads versions {READABLE_VERSIONS}"
        )
    return info


def load_head(path: str) -> tuple[MLMHead, dict]:
    """Read a head written by :func:`save_head` (``path`` = the safetensors file): the head, with its tuned
    encoder tensors in :attr:`MLMHead.encoder_tensors` (empty for version 1 or an untuned fit), and the
    ``.json``'s contents. Apply the tensors to the encoder with :func:`apply_tuned_encoder`."""
    from safetensors.torch import load_file

    weights = Path(path)
    info = _read_info(weights)
    head = MLMHead(info["hidden_size"], info["vocab_size"], info["layer_norm_eps"], info["hidden_act"])
    state = load_file(str(weights))
    encoder_tensors = {k[len(ENCODER_PREFIX):]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
    head_state = {k: v for k, v in state.items() if not k.startswith(ENCODER_PREFIX)}
    missing, unexpected = head.load_state_dict(head_state, strict=False)
    if missing or unexpected:
        raise DataError(str(weights), f"tensor names do not match a head (missing {missing}, unexpected {unexpected})")
    listed = sorted(info.get("tuned_parameters", []))
    if listed != sorted(encoder_tensors):
        raise DataError(
            str(weights),
            f"its encoder tensors {sorted(encoder_tensors)[:4]}… do not match the tuned_parameters listed in "
            f"{weights.with_suffix('.json')} ({listed[:4]}…)",
        )
    head.encoder_tensors = encoder_tensors
    head.tuned_layers = list(info.get("tuned_layers", []))
    return head, info


def apply_tuned_encoder(encoder: nn.Module, head: MLMHead, info: dict, head_path: str) -> int:
    """Copy the head's tuned encoder tensors into ``encoder`` (in place); returns how many were copied.

    Names are relative to the bare encoder (``encoder.base_model``); a name the encoder lacks or a shape that
    differs is a :class:`DataError` naming ``head_path`` and the encoder the head was fitted on.
    """
    if not head.encoder_tensors:
        return 0
    base = getattr(encoder, "base_model", encoder)
    params = dict(base.named_parameters())
    fitted_on = info.get("encoder", "an unrecorded encoder")
    for name, value in head.encoder_tensors.items():
        target = params.get(name)
        if target is None:
            raise DataError(
                head_path,
                f"tuned encoder tensor {name!r} is no parameter of this {type(base).__name__} "
                f"(the head was fitted on {fitted_on})",
            )
        if tuple(target.shape) != tuple(value.shape):
            raise DataError(
                head_path,
                f"tuned encoder tensor {name!r} has shape {tuple(value.shape)}, the encoder's has "
                f"{tuple(target.shape)} (the head was fitted on {fitted_on})",
            )
    with torch.no_grad():
        for name, value in head.encoder_tensors.items():
            params[name].copy_(value.to(params[name].dtype))
    return len(head.encoder_tensors)
