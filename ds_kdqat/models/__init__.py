"""Encoder adapters: the shared attention hook point, taps and intervention points."""

from .adapters import ADAPTERS, EncoderAdapter, adapter_for, register_adapter
from .taps import TAP_NAMES, EncoderTaps, Interventions, forward_with_taps

__all__ = ["ADAPTERS", "EncoderAdapter", "adapter_for", "register_adapter", "TAP_NAMES", "EncoderTaps",
           "Interventions", "forward_with_taps"]
