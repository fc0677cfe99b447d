"""ds-kdqat: ternary-weight, 8-bit-activation Transformer encoders by QAT with knowledge distillation."""

__version__ = "0.1.0"
