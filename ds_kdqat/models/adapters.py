"""Compatibility names for the family adapters (now in :mod:`ds_kdqat.models.families`).

``ADAPTERS`` is :data:`~ds_kdqat.models.families.FAMILIES` (HF ``model_type`` → :class:`FamilyAdapter`),
``EncoderAdapter`` is :class:`~ds_kdqat.models.families.FamilyAdapter`, and :func:`adapter_for` looks a model's
adapter up by its ``config.model_type``.
"""

from __future__ import annotations

from .families import FAMILIES, FamilyAdapter, adapter_for, adapter_for_config, register_family

ADAPTERS = FAMILIES
EncoderAdapter = FamilyAdapter

__all__ = ["ADAPTERS", "EncoderAdapter", "FamilyAdapter", "adapter_for", "adapter_for_config", "register_family"]
