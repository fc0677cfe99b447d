"""ds-kdqat: ternary-weight, 8-bit-activation Transformer encoders by QAT with knowledge distillation.

``ds_kdqat.load_student(path, backend="fakequant" | "int8" | "onnx")`` turns an exported student folder into a
ready model (:mod:`ds_kdqat.deploy`); the rest is imported from its modules.
"""

__version__ = "0.1.0"


def load_student(path, backend: str = "fakequant", *, frozen: bool = True, weights: str = "int8",
                 compile: bool = False):
    """See :func:`ds_kdqat.deploy.load.load_student` (imported on first use: ``import ds_kdqat`` stays light)."""
    from ds_kdqat.deploy.load import load_student as load

    return load(path, backend, frozen=frozen, weights=weights, compile=compile)
