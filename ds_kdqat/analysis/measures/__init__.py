"""Every analysis metric, each a ``compute``/``write`` pair (see :mod:`.base`), in the plain dict :data:`METRICS`.

``analyze`` runs the enabled ones over a split; ``write_analysis`` lets each write its own files, in this
order (which is also the key order of a model's entry in ``metrics.json``).
"""

from __future__ import annotations

from . import attention_heads, attention_maps, error_propagation, hessian_spectrum, output_ranges, sa_distance
from .base import Metric

METRICS: dict[str, Metric] = {
    "attention_heads": Metric(attention_heads.AttentionHeads, attention_heads.write),
    "error_propagation": Metric(error_propagation.ErrorPropagation, error_propagation.write),
    "sa_distance": Metric(sa_distance.SADistance, sa_distance.write),
    "attention_output_range": Metric(output_ranges.OutputRanges, output_ranges.write),
    "attention_maps": Metric(attention_maps.AttentionMaps, attention_maps.write),
    "hessian": Metric(hessian_spectrum.HessianSpectrum, hessian_spectrum.write, hessian_spectrum.enabled),
}
