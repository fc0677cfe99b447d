"""Tokenise examples into a torch Dataset, and pad batches dynamically.

Examples are stored unpadded (one flat token buffer plus offsets, so a large train set costs ~4 bytes per
token); :func:`collate` pads each batch on the right to its longest example.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Callable, Optional, Sequence

import torch
from torch.utils.data import Dataset

from ds_kdqat.data.glue_format import Example
from ds_kdqat.data.tasks import TaskSpec
from ds_kdqat.errors import ConfigError, DataError

Batch = dict[str, torch.Tensor]
_CHUNK = 2048  # examples per tokenizer call: bounds the memory of the Python lists the tokenizer returns

# Text encoders whose position ids start after the padding index (RoBERTa's scheme: position = pad + 1 + i),
# so ``max_position_embeddings - pad_token_id - 1`` positions are usable.
PAD_OFFSET_MODEL_TYPES = frozenset({
    "roberta", "roberta-prelayernorm", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer",
    "data2vec-text", "ibert", "mpnet", "luke", "xmod", "markuplm", "layoutlmv3", "lilt",
})
# Encoders with only relative positions: no limit on the sequence length.
RELATIVE_POSITION_MODEL_TYPES = frozenset({"t5", "mt5", "umt5", "longt5"})
# Models without token positions (images): max_seq_length does not apply.
NO_TEXT_POSITION_MODEL_TYPES = frozenset({"vit", "deit", "beit", "swin", "convnext", "dinov2"})


class EncodedDataset(Dataset):
    """Tokenised examples of one split.

    ``dataset[i]`` is a dict of tensors:
        ``input_ids`` int64 ``(len_i,)``, ``attention_mask`` int64 ``(len_i,)`` of ones,
        ``token_type_ids`` int64 ``(len_i,)`` (only when the tokenizer produces them),
        ``labels`` scalar: int64 class index (classification) or float32 score (regression).
    ``len_i <= max_seq_length`` counts the special tokens. Use :attr:`collate_fn` as a DataLoader's
    ``collate_fn``: it pads with the tokenizer's pad id.
    """

    def __init__(
        self,
        input_ids: torch.Tensor,
        offsets: torch.Tensor,
        labels: torch.Tensor,
        token_type_ids: Optional[torch.Tensor],
        pad_token_id: int,
        pad_token_type_id: int = 0,
        class_names: Sequence[str] = (),
    ):
        self.class_names = tuple(class_names)  # the task's labels in class-index order (empty for regression)
        self.input_ids = input_ids
        self.offsets = offsets
        self.labels = labels
        self.token_type_ids = token_type_ids
        self.pad_token_id = pad_token_id
        self.pad_token_type_id = pad_token_type_id

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> Batch:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        index %= len(self)
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        ids = self.input_ids[start:end].long()
        item = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if self.token_type_ids is not None:
            item["token_type_ids"] = self.token_type_ids[start:end].long()
        item["labels"] = self.labels[index]
        return item

    def lengths(self) -> torch.Tensor:
        """Token count of every example, shape ``(n,)``."""
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def collate_fn(self) -> Callable[[Sequence[Batch]], Batch]:
        """:func:`collate` bound to this dataset's pad ids."""
        return functools.partial(collate, pad_token_id=self.pad_token_id, pad_token_type_id=self.pad_token_type_id)


def _config_value(model_config: Any, name: str) -> Any:
    """``name`` of a Hugging Face config object, or of its ``config.json`` dict; None when absent."""
    if isinstance(model_config, dict):
        return model_config.get(name)
    return getattr(model_config, name, None)


def max_positions(model_config: Any) -> tuple[Optional[int], str]:
    """(tokens the model can position, how that follows from its config); (None, why) when there is no limit.

    ``model_config`` is a ``transformers`` config (``AutoConfig.from_pretrained(path)``) or its dict.
    BERT-like: ``max_position_embeddings``; RoBERTa-like (:data:`PAD_OFFSET_MODEL_TYPES`):
    ``max_position_embeddings - pad_token_id - 1``; T5 and DeBERTa without absolute positions: no limit;
    image models: not applicable (None).
    """
    model_type = str(_config_value(model_config, "model_type") or "")
    if model_type in NO_TEXT_POSITION_MODEL_TYPES:
        return None, f"model type {model_type!r} has no token positions"
    if model_type in RELATIVE_POSITION_MODEL_TYPES:
        return None, f"model type {model_type!r} uses relative positions only"
    if model_type.startswith("deberta") and _config_value(model_config, "position_biased_input") is False:
        return None, f"model type {model_type!r} has no absolute positions (position_biased_input false)"
    positions = _config_value(model_config, "max_position_embeddings")
    if not isinstance(positions, int) or isinstance(positions, bool):
        return None, f"model type {model_type!r} sets no max_position_embeddings"
    if model_type in PAD_OFFSET_MODEL_TYPES:
        pad = _config_value(model_config, "pad_token_id")
        pad = pad if isinstance(pad, int) and not isinstance(pad, bool) else 1
        return positions - pad - 1, (f"max_position_embeddings {positions} - pad_token_id {pad} - 1, "
                                     f"{model_type}'s positions start after the padding index")
    return positions, f"max_position_embeddings {positions}"


def check_max_seq_length(
    model_config: Any, max_seq_length: int, key: str = "kdqat.data.max_seq_length"
) -> Optional[int]:
    """Raise :class:`ConfigError` at ``key`` when ``max_seq_length`` exceeds the model's positions.

    Returns the model's limit (None when it has none). A longer setting would pass the config check and then
    fail in the forward pass at the first long example.
    """
    limit, how = max_positions(model_config)
    if limit is not None and max_seq_length > limit:
        model_type = _config_value(model_config, "model_type") or "model"
        raise ConfigError(key, f"got {max_seq_length}; the {model_type} model takes at most {limit} tokens "
                               f"({how}); set it to {limit} or less")
    return limit


def label_tensor(examples: Sequence[Example], spec: TaskSpec) -> torch.Tensor:
    """Labels as a tensor ``(n,)``: int64 class indices, or float32 scores for regression."""
    if spec.is_regression:
        try:
            return torch.tensor([float(ex.label) for ex in examples], dtype=torch.float32)
        except ValueError as exc:
            raise DataError(spec.name, f"non-numeric score: {exc}") from None
    index = spec.label_index()
    missing = next((ex for ex in examples if ex.label not in index), None)
    if missing is not None:
        raise DataError(f"{spec.name}:{missing.line}", f"unknown label {missing.label!r} (allowed: {list(spec.labels)})")
    return torch.tensor([index[ex.label] for ex in examples], dtype=torch.int64)


def encode(examples: Sequence[Example], tokenizer: Any, spec: TaskSpec, max_seq_length: int) -> EncodedDataset:
    """Tokenise ``examples`` (pairs as ``[CLS] a [SEP] b [SEP]``), truncating to ``max_seq_length`` tokens.

    Pairs are truncated longest-first. ``tokenizer`` is a Hugging Face tokenizer (e.g.
    ``AutoTokenizer.from_pretrained(path)``); its ``pad_token_id`` must be set.
    """
    if not examples:
        raise ValueError(f"no examples to encode for task {spec.name!r}")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token before encoding")
    if spec.is_pair and any(ex.text_b is None for ex in examples):
        raise ValueError(f"task {spec.name!r} is a sentence-pair task but an example has no text_b")

    ids_parts: list[torch.Tensor] = []
    type_parts: list[torch.Tensor] = []
    lengths: list[int] = []
    has_types = True
    for start in range(0, len(examples), _CHUNK):
        chunk = examples[start : start + _CHUNK]
        text_a = [ex.text_a for ex in chunk]
        text_b = [ex.text_b for ex in chunk] if spec.is_pair else None
        out = tokenizer(text_a, text_b, truncation=True, max_length=max_seq_length, return_attention_mask=False)
        has_types = has_types and "token_type_ids" in out
        lengths.extend(len(ids) for ids in out["input_ids"])
        ids_parts.append(torch.tensor(list(itertools.chain.from_iterable(out["input_ids"])), dtype=torch.int32))
        if has_types:
            types = list(itertools.chain.from_iterable(out["token_type_ids"]))
            type_parts.append(torch.tensor(types, dtype=torch.int8))

    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
    return EncodedDataset(
        input_ids=torch.cat(ids_parts),
        offsets=offsets,
        labels=label_tensor(examples, spec),
        token_type_ids=torch.cat(type_parts) if has_types else None,
        pad_token_id=int(tokenizer.pad_token_id),
        pad_token_type_id=int(getattr(tokenizer, "pad_token_type_id", 0) or 0),
        class_names=spec.labels,
    )


def collate(
    batch: Sequence[Batch],
    pad_token_id: int = 0,
    pad_token_type_id: int = 0,
    pad_to_multiple_of: Optional[int] = None,
) -> Batch:
    """Stack items of :class:`EncodedDataset` into a batch padded on the right to the longest item.

    Returns ``input_ids``, ``attention_mask`` (1 = token, 0 = padding) and, when the items have them,
    ``token_type_ids``, each int64 ``(batch, T)`` with ``T = max len_i`` (rounded up to a multiple of
    ``pad_to_multiple_of`` when given); and ``labels`` ``(batch,)`` int64 or float32.
    """
    if not batch:
        raise ValueError("empty batch")
    longest = max(item["input_ids"].shape[0] for item in batch)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    pads = {"input_ids": pad_token_id, "attention_mask": 0, "token_type_ids": pad_token_type_id}
    out: Batch = {}
    for key, pad in pads.items():
        if key not in batch[0]:
            continue
        padded = torch.full((len(batch), longest), pad, dtype=torch.int64)
        for row, item in enumerate(batch):
            values = item[key]
            padded[row, : values.shape[0]] = values
        out[key] = padded
    out["labels"] = torch.stack([item["labels"] for item in batch])
    return out
