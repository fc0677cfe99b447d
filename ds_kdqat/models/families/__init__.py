"""One adapter per model family (see :mod:`.base`), registered in :data:`FAMILIES` by HF ``model_type``.

=============  =================================  ==========  =====================================
family         model types                        input       status
=============  =================================  ==========  =====================================
bert           bert, roberta, electra             tokens      supported
distilbert     distilbert                         tokens      supported (no token_type_ids)
t5             t5, mt5, umt5                      tokens      supported (encoder only, pre-LN: see its module)
vit            vit                                pixels      supported (pre-LN: see its module)
=============  =================================  ==========  =====================================

Adding a family: a module here whose decorated function returns its :class:`FamilyAdapter`, imported below,
and its test (``tests/test_families.py``'s parameter list).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ds_kdqat.errors import ConfigError

from . import bert, distilbert, t5, vit  # noqa: F401 - each registers its adapter
from .base import (
    FAMILIES,
    INPUT_KINDS,
    LAYER_ROLES,
    MODEL_ROLES,
    ROLE_NAMES,
    FamilyAdapter,
    has_image_classification_head,
    has_sequence_classification_head,
    load_image_classifier,
    load_sequence_classifier,
    per_layer,
    register_family,
)


def adapter_for(model: nn.Module) -> FamilyAdapter:
    """The adapter of ``model`` by its ``config.model_type``; ValueError names the known types."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"no encoder adapter for model_type {model_type!r} ({type(model).__name__}); "
            f"supported: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


def adapter_for_config(config: Any) -> FamilyAdapter:
    """The adapter of an HF config (``AutoConfig``); ValueError names the known types."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"no encoder adapter for model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


def supported_model_types() -> list[str]:
    """The model types the whole pipeline (fine-tune, KD-QAT, export) runs on, sorted."""
    return sorted(t for t, adapter in FAMILIES.items() if adapter.status == "supported")


def check_model_type(config: Any, key: str) -> FamilyAdapter:
    """The adapter of ``config`` (the teacher's ``AutoConfig``) when the pipeline supports it, else a
    :class:`ConfigError` naming ``key`` and the supported model types (before anything is loaded)."""
    model_type = getattr(config, "model_type", None)
    supported = ", ".join(supported_model_types())
    adapter = FAMILIES.get(model_type)
    if adapter is None:
        raise ConfigError(key, f"model_type '{model_type}' has no ds-kdqat adapter; supported: {supported}")
    if adapter.status != "supported":
        raise ConfigError(key, f"model_type '{model_type}': the {adapter.family} adapter is partial "
                          f"({adapter.note}); supported: {supported}")
    return adapter


def attention_class_names() -> frozenset[str]:
    """The union of the registered families' self-attention class names."""
    return frozenset(name for adapter in FAMILIES.values() for name in adapter.attention_classes)


__all__ = [
    "FAMILIES", "INPUT_KINDS", "LAYER_ROLES", "MODEL_ROLES", "ROLE_NAMES", "FamilyAdapter", "adapter_for",
    "adapter_for_config", "attention_class_names", "check_model_type", "has_image_classification_head",
    "has_sequence_classification_head", "load_image_classifier", "load_sequence_classifier", "per_layer",
    "register_family", "supported_model_types",
]
