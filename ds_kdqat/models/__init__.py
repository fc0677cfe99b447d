"""Encoder adapters: the shared attention hook point, taps and intervention points."""
