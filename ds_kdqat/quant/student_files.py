"""The files beside a saved student's HF weights that turn them back into the same quantized model.

``kdqat_quant.json`` is the :class:`QuantConfig` it was trained with; ``kdqat_lat.safetensors`` holds the LAT
second moments its ternary weights depend on (only for LAT groups). The training pipeline writes both, and
the pipeline's final evaluation and ``run/analyze.py`` read them back through :func:`quantize_saved_student`.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from torch import nn

from ds_kdqat.fileio import atomic_write_json
from ds_kdqat.quant.config import QuantConfig, quant_config_from_dict
from ds_kdqat.quant.convert import quantize_model
from ds_kdqat.quant.lat import lat_state, load_lat_state

QUANT_CONFIG_FILE = "kdqat_quant.json"
LAT_STATE_FILE = "kdqat_lat.safetensors"


def write_student_files(model: nn.Module, folder: str, config: QuantConfig) -> None:
    """Write the quant config and (for LAT students) the second moments of ``model`` into ``folder``."""
    from safetensors.torch import save_file

    from ds_kdqat.configtools import to_dict

    atomic_write_json(os.path.join(folder, QUANT_CONFIG_FILE), to_dict(config))
    moments = lat_state(model)
    if moments:
        save_file({k: v.contiguous() for k, v in moments.items()}, os.path.join(folder, LAT_STATE_FILE))


def quantize_saved_student(model: nn.Module, folder: str, config: Optional[QuantConfig] = None) -> nn.Module:
    """Quantize ``model`` (the student's latent weights, loaded from ``folder``) as it was trained: with
    ``config``, else ``folder``'s ``kdqat_quant.json``; then restore its LAT second moments if saved."""
    from safetensors.torch import load_file

    if config is None:
        path = os.path.join(folder, QUANT_CONFIG_FILE)
        with open(path, encoding="utf-8") as handle:
            config = quant_config_from_dict(json.load(handle), path)
    quantize_model(model, config)
    lat_path = os.path.join(folder, LAT_STATE_FILE)
    if os.path.exists(lat_path):
        load_lat_state(model, load_file(lat_path))
    return model
