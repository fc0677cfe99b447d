"""Quantization: functional quantizers (STE), quantized modules, model conversion, packed export.

Typical use::

    from ds_kdqat.quant import QuantConfig, quantize_model, after_optimizer_step, export_packed
    report = quantize_model(student, QuantConfig())        # TernaryBERT W2-E2-A8, in place
    ...  # each applied optimizer step:  after_optimizer_step(student, optimizer=opt)   (no-op without LAT)
    export_packed(student, "out/packed")                   # -> SizeReport (W-E-A bits, MiB, ratio to fp32)
    model = load_packed("out/packed", make_fp32_model)     # logits equal the exported student's

LAT's second moment, and what the training loop must do for it, is described in :mod:`ds_kdqat.quant.modules`.
In a forward that records a graph, fake-quantized tensors are saved for the backward as their integer codes
(:mod:`ds_kdqat.quant.codes`).
Quantization methods (TWN, LAT, binary, uniform, LSQ) are classes registered in
:data:`ds_kdqat.quant.methods.QUANT_METHODS`; config validation, the modules and the export all read it.
"""

from ds_kdqat.quant.config import (
    AttentionActConfig,
    GroupConfig,
    LatConfig,
    QuantConfig,
    quant_config_from_dict,
)
from ds_kdqat.quant.convert import QuantEntry, QuantReport, model_quant_config, quantize_model, quantized_weights
from ds_kdqat.quant.export import (
    SizeReport,
    export_packed,
    file_checksums,
    load_packed,
    read_manifest,
    size_report,
    verify_files,
)
from ds_kdqat.quant.functional import (
    QuantParts,
    binarize,
    binary_parts,
    dequantize_parts,
    lat_parts,
    lat_ternarize,
    lsq_initial_step,
    lsq_parts,
    lsq_quantize,
    straight_through,
    twn_parts,
    twn_ternarize,
    uniform_parts,
    uniform_quantize,
)
from ds_kdqat.quant.lat import after_optimizer_step, lat_state, load_lat_state
from ds_kdqat.quant.methods import QUANT_METHODS, QuantMethod, register_method
from ds_kdqat.quant.modules import (
    ActQuantizer,
    QuantEmbedding,
    QuantLinear,
    WeightQuantizer,
    clear_quant_caches,
    reuse_quantized_weights,
)
from ds_kdqat.quant.presets import PRESETS

__all__ = [
    "ActQuantizer", "AttentionActConfig", "GroupConfig", "LatConfig", "PRESETS", "QUANT_METHODS", "QuantConfig",
    "QuantEmbedding", "QuantEntry", "QuantLinear", "QuantMethod", "QuantParts", "QuantReport", "SizeReport",
    "WeightQuantizer", "after_optimizer_step", "clear_quant_caches", "reuse_quantized_weights", "binarize", "binary_parts", "dequantize_parts", "export_packed",
    "lat_parts", "lat_state", "lat_ternarize", "load_lat_state", "load_packed", "lsq_initial_step", "lsq_parts",
    "lsq_quantize", "model_quant_config", "quant_config_from_dict", "quantize_model", "quantized_weights",
    "read_manifest", "register_method", "size_report", "verify_files", "file_checksums", "straight_through", "twn_parts", "twn_ternarize",
    "uniform_parts", "uniform_quantize",
]
