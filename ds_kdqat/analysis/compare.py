"""Teacher vs quantized-before-QAT vs student on one data split: every analysis metric, accumulated over batches.

This is the one place that runs models (through :func:`ds_kdqat.models.taps.forward_with_taps`). ``models``
maps a name to a model; ``"teacher"`` is required and every other model is compared against it (usually
``"quantized"``, the teacher converted by ``quantize_model`` without training, and ``"student"``, the model
after KD-QAT). Each batch, run through every model once, goes to each enabled metric of
:data:`ds_kdqat.analysis.measures.METRICS`; what they reduce over the split (padding excluded everywhere) is
in each metric's module:

* :mod:`~.measures.attention_heads` — cover length ratio, ranking loss (per layer, head);
* :mod:`~.measures.error_propagation` — layer-wise MSE of layer and attention outputs;
* :mod:`~.measures.sa_distance` — SA-GEN / SA-PROP distance (per layer, head; all tokens and the special one);
* :mod:`~.measures.output_ranges` — attention-output min/max per (layer, position);
* :mod:`~.measures.attention_maps` — heatmaps of one example;
* :mod:`~.measures.hessian_spectrum` — top Hessian eigenvalues of the task loss.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Mapping, Optional

import torch
from torch import nn

from .config import AnalysisConfig, HessianConfig
from .measures import METRICS
from .measures.base import Setup, Step
from .result import AnalysisResult

__all__ = ["AnalysisConfig", "AnalysisResult", "HessianConfig", "analyze"]  # callers import the config from here

RECORD = {"attention_maps", "attention_outputs", "layer_outputs"}


def _steps(models: Mapping[str, nn.Module], batches: Iterable[Mapping[str, torch.Tensor]], config: AnalysisConfig,
           special_token_id: Optional[int], device: torch.device) -> Iterator[Step]:
    """The split's batches (cut at ``config.max_examples``), on ``device``, each run through every model."""
    from ..models.taps import forward_with_taps

    seen = 0
    for batch in batches:
        if config.max_examples is not None and seen >= config.max_examples:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        if config.max_examples is not None and seen + batch["input_ids"].shape[0] > config.max_examples:
            batch = {k: v[: config.max_examples - seen] for k, v in batch.items()}
        size = batch["input_ids"].shape[0]
        mask = batch.get("attention_mask")
        if mask is None:
            mask = batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        special = (batch["input_ids"] == special_token_id) if special_token_id is not None else None
        with torch.no_grad():
            taps = {name: forward_with_taps(model, batch, RECORD) for name, model in models.items()}
        maps = taps["teacher"].attention_maps
        yield Step(batch, mask, special, taps, first=seen, size=size, layers=len(maps), heads=maps[0].shape[1])
        seen += size


def analyze(
    models: Mapping[str, nn.Module],
    batches: Iterable[Mapping[str, torch.Tensor]],
    config: AnalysisConfig,
    special_token_id: Optional[int] = None,
    id_to_token: Optional[Callable[[list[int]], list[str]]] = None,
    device: Optional[torch.device] = None,
) -> AnalysisResult:
    """Run every model on ``batches`` and measure every enabled metric (see the module docstring).

    ``batches``: dicts with ``input_ids`` and ``attention_mask`` (B, S), optionally ``token_type_ids`` and
    ``labels``; ``special_token_id``: the id of ``config.special_token`` (None skips the special-token
    distances); ``id_to_token`` turns the heatmap example's ids into labels for the axes.
    """
    if "teacher" not in models:
        raise ValueError(f"models must include 'teacher'; got {sorted(models)}")
    device = device or torch.device("cpu")
    for model in models.values():
        model.to(device).eval()
    setup = Setup(config, models, special_token_id, id_to_token, device)
    active = [metric.compute(setup) for metric in METRICS.values() if metric.enabled(config)]
    result = AnalysisResult(cover_top_k=config.cover_top_k)
    for step in _steps(models, batches, config, special_token_id, device):
        result.num_layers, result.num_heads = step.layers, step.heads
        with torch.no_grad():
            for accumulator in active:
                accumulator.add(step)
        result.num_examples += step.size
    if result.num_examples == 0:
        raise ValueError("no examples to analyze")
    for accumulator in active:
        accumulator.finish(result)
    return result
