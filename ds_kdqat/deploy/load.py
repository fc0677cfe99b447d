"""``load_student(path, backend)``: an exported student folder → a ready model, in one call.

Backends (:data:`BACKENDS`):

* ``"fakequant"``: the trained student's own forward (fp32 decoded weights, fake-quant activations); with
  ``frozen=True`` (default) its logits equal the exported student's bit for bit;
* ``"int8"``: the same model with int8-code linears and embeddings (:mod:`ds_kdqat.deploy.int_modules`):
  int8 × int8 → int32 GEMMs (Q, K and V as one), a quarter of fp32's weight memory; logits equal the fake-quant
  ones up to float rounding of the final scaling. ``weights="packed2"`` keeps ternary and binary codes packed 4
  per byte (a sixteenth of fp32) and unpacks each linear's just before its GEMM, for the same logits;
* ``"onnx"``: the ONNX Runtime session of the export's ONNX file (:mod:`ds_kdqat.deploy.onnx_backend`).

The returned model is in eval mode and carries ``model.kdqat_export``: an :class:`ExportInfo` (folder, task,
manifest) that the predictor reads labels and preprocessing from.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

from torch import nn

from ds_kdqat.deploy.artifact import read_export
from ds_kdqat.deploy.int_modules import check_weight_mode
from ds_kdqat.errors import ConfigError, DataError
from ds_kdqat.quant.export import load_packed, verify_files


@dataclass
class ExportInfo:
    folder: Path
    manifest: dict
    backend: str

    @property
    def task(self) -> dict:
        return self.manifest["task"]

    @property
    def labels(self) -> list[str]:
        return list(self.task["labels"])


def architecture_class(name: str, source: str) -> type:
    """The model class an export names: one of transformers' or one ds-kdqat's families define."""
    import transformers

    import ds_kdqat.models.families  # noqa: F401  (imports every family module, so their classes are found)

    cls = getattr(transformers, name, None)
    if cls is None:
        for module_name, module in list(sys.modules.items()):
            if module_name.startswith("ds_kdqat.models.") and isinstance(getattr(module, name, None), type):
                cls = getattr(module, name)
                break
    if cls is None or not issubclass(cls, nn.Module):
        raise DataError(source, f"model.architecture: {name!r} is no model class of transformers or ds-kdqat")
    return cls


def build_skeleton(folder: Union[str, os.PathLike], architecture: str) -> nn.Module:
    """The export's architecture built from its ``config.json`` without initialising weights (their memory is
    allocated but not touched until the export's values are loaded)."""
    from transformers import AutoConfig
    from transformers.initialization import no_init_weights

    path = Path(folder)
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise DataError(str(path / "config.json"), f"not a readable model config: {err}") from None
    config._attn_implementation = "eager"
    cls = architecture_class(architecture, str(path / "manifest.json"))
    with no_init_weights():
        model = cls(config)
    return model.eval()


def _load_torch(folder: Path, manifest: dict, backend: str, frozen: bool, weights: str, compile: bool) -> nn.Module:
    model = build_skeleton(folder, manifest["model"]["architecture"])
    integer = backend == "int8"
    model = load_packed(folder, model, frozen=frozen, integer=integer, verify=False, integer_weights=weights)
    if integer:
        from ds_kdqat.deploy.int_modules import finish_integer_model

        finish_integer_model(model, compile=compile)
    return model.eval()


def _load_onnx(folder: Path, manifest: dict, backend: str, frozen: bool, weights: str, compile: bool) -> nn.Module:
    from ds_kdqat.deploy.onnx_backend import load_onnx_student

    return load_onnx_student(folder, manifest)


BACKENDS: dict[str, Callable[[Path, dict, str, bool, str, bool], nn.Module]] = {
    "fakequant": _load_torch, "int8": _load_torch, "onnx": _load_onnx,
}


def load_student(path: Union[str, os.PathLike], backend: str = "fakequant", *, frozen: bool = True,
                 weights: str = "int8", compile: bool = False) -> nn.Module:
    """The exported student at ``path`` as a ready model (eval mode) on the CPU; see the module docstring.

    ``frozen`` (fakequant only): keep the decoded weights as they are (exact logits); ``False`` re-quantizes
    them each forward, for further training. ``weights`` (int8 backend only): ``"int8"`` (default) or
    ``"packed2"`` (:data:`~ds_kdqat.deploy.int_modules.WEIGHT_MODES`). ``compile`` (int8 backend only): run
    the element-wise work (activation encoding, attention fake quantization) by ``torch.compile``'d kernels: the
    same logits, faster after the first forwards, which compile them (seconds; needs a C++ compiler, falls back
    to eager with a warning).

    A damaged folder (a file missing, truncated or changed, a tensor missing or of the wrong shape) raises
    :class:`~ds_kdqat.errors.DataError` naming the file; nothing is loaded silently wrong.
    """
    if backend not in BACKENDS:
        raise ConfigError("backend", f"got {backend!r}, expected one of {sorted(BACKENDS)}")
    check_weight_mode(weights)
    if weights != "int8" and backend != "int8":
        raise ConfigError("weights", f"{weights!r} is a mode of the int8 backend; the {backend} backend holds its "
                                     "weights its own way (use backend='int8', or weights='int8')")
    if compile and backend != "int8":
        raise ConfigError("compile", f"compiled kernels are the int8 backend's; the {backend} backend has none")
    folder = Path(path)
    manifest = read_export(folder)
    verify_files(folder, manifest)
    model = BACKENDS[backend](folder, manifest, backend, frozen, weights, compile)
    model.kdqat_export = ExportInfo(folder, manifest, backend)
    return model
