"""The files beside a saved student's HF weights that turn them back into the same quantized model.

``kdqat_quant.json`` is the :class:`QuantConfig` it was trained with; ``kdqat_lat.safetensors`` holds the LAT
second moments its ternary weights depend on (only for LAT groups); ``kdqat_act_quant.safetensors`` holds the
learned tensors of its activation quantizers (only with learned methods such as LSQ: their step sizes are in
the student's state dict, but a model rebuilt from the HF files drops keys its architecture does not have).
The training pipeline writes them, and the pipeline's final evaluation and ``run/analyze.py`` read them back
through :func:`quantize_saved_student`.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
from torch import nn

from ds_kdqat.fileio import atomic_write_json
from ds_kdqat.quant.config import QuantConfig, quant_config_from_dict
from ds_kdqat.quant.convert import quantize_model
from ds_kdqat.quant.lat import lat_state, load_lat_state
from ds_kdqat.quant.modules import ActQuantizer

QUANT_CONFIG_FILE = "kdqat_quant.json"
LAT_STATE_FILE = "kdqat_lat.safetensors"
ACT_STATE_FILE = "kdqat_act_quant.safetensors"


def act_quant_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``"<quantizer module>.<key>"`` → CPU tensor: the state dicts of activation quantizers that have one."""
    return {f"{name}.{key}": value.detach().cpu().clone()
            for name, module in model.named_modules() if isinstance(module, ActQuantizer)
            for key, value in module.state_dict().items()}


def load_act_quant_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Restore :func:`act_quant_state`; every key must name a tensor of an activation quantizer of ``model``."""
    quantizers = {name: m for name, m in model.named_modules() if isinstance(m, ActQuantizer)}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name, _, tensor = key.rpartition(".")
        if name not in quantizers:
            raise KeyError(f"{key!r} is not a tensor of an activation quantizer of this model")
        grouped.setdefault(name, {})[tensor] = value
    for name, tensors in grouped.items():
        quantizers[name].load_state_dict(tensors)


def write_student_files(model: nn.Module, folder: str, config: QuantConfig) -> None:
    """Write the quant config and (for LAT students) the second moments of ``model`` into ``folder``."""
    from safetensors.torch import save_file

    from ds_kdqat.configtools import to_dict

    atomic_write_json(os.path.join(folder, QUANT_CONFIG_FILE), to_dict(config))
    moments = lat_state(model)
    if moments:
        save_file({k: v.contiguous() for k, v in moments.items()}, os.path.join(folder, LAT_STATE_FILE))
    act_state = act_quant_state(model)
    if act_state:
        save_file({k: v.contiguous() for k, v in act_state.items()}, os.path.join(folder, ACT_STATE_FILE))


def quantize_saved_student(model: nn.Module, folder: str, config: Optional[QuantConfig] = None) -> nn.Module:
    """Quantize ``model`` (the student's latent weights, loaded from ``folder``) as it was trained: with
    ``config``, else ``folder``'s ``kdqat_quant.json``; then restore its LAT second moments and learned
    activation-quantizer tensors if saved."""
    from safetensors.torch import load_file

    if config is None:
        path = os.path.join(folder, QUANT_CONFIG_FILE)
        with open(path, encoding="utf-8") as handle:
            config = quant_config_from_dict(json.load(handle), path)
    quantize_model(model, config)
    lat_path = os.path.join(folder, LAT_STATE_FILE)
    if os.path.exists(lat_path):
        load_lat_state(model, load_file(lat_path))
    act_path = os.path.join(folder, ACT_STATE_FILE)
    if os.path.exists(act_path):
        load_act_quant_state(model, load_file(act_path))
    return model
