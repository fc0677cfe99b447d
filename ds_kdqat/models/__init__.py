"""Model families (one adapter each), the shared attention hook point, taps and intervention points."""

from .families import FAMILIES, FamilyAdapter, adapter_for, adapter_for_config, check_model_type, register_family
from .taps import TAP_NAMES, EncoderTaps, Interventions, forward_with_taps

__all__ = ["FAMILIES", "FamilyAdapter", "adapter_for", "adapter_for_config",
           "check_model_type", "register_family", "TAP_NAMES", "EncoderTaps", "Interventions", "forward_with_taps"]
