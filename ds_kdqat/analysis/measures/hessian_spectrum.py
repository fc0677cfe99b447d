"""Hessian: top eigenvalues of the task loss w.r.t. each chosen model's parameters (``config.hessian``).

Loss: cross-entropy, or MSE for one-output regression, over the first ``hessian.batches`` batches, with the
data's labels or, when the data has none, the teacher's predictions. Eigenvalues by power iteration on
Hessian-vector products (:mod:`ds_kdqat.analysis.hessian`); through the student's straight-through
quantizers this is the Hessian that QAT's gradients see. Result: ``hessian[model]`` (:class:`HessianSummary`).
Files: ``hessian.csv`` (model, rank, eigenvalue, iterations, converged, num_params) and ``hessian.png`` when
there are eigenvalues; ``metrics.json``: ``hessian[model]`` (always present, ``{}`` when disabled).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from .. import plots
from ..config import AnalysisConfig, HessianConfig
from ..hessian import top_hessian_eigenvalues
from ..result import AnalysisResult, HessianSummary
from .base import Report, Setup, Step


def _task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if logits.shape[-1] == 1 and labels.is_floating_point():
        return F.mse_loss(logits.squeeze(-1), labels)
    return F.cross_entropy(logits, labels.long())


def _model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if batch.get(k) is not None}


def hessian_of_model(model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]], config: HessianConfig,
                     device: torch.device) -> HessianSummary:
    """Top Hessian eigenvalues of the task loss over ``batches`` (each with ``labels``)."""
    from ...models.attention import KDQAT_ATTENTION, self_attention_modules, use_kdqat_attention

    model.eval()
    # Fused SDPA kernels have no double backward; the kdqat (eager) attention has.
    if self_attention_modules(model) and getattr(model.config, "_attn_implementation", None) != KDQAT_ATTENTION:
        use_kdqat_attention(model)
    scope = model
    if config.params == "encoder":  # the transformer layers, as the family adapter names them
        from ...models.families import adapter_for

        try:
            scope = adapter_for(model).layer_list(model)
        except (ValueError, AttributeError) as error:
            raise ConfigError("analysis.hessian.params", f"{type(model).__name__}: no encoder layers ({error})") \
                from None
    params = [p for p in scope.parameters() if p.is_floating_point()]
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)

    def closure(batch):
        def loss() -> torch.Tensor:
            return _task_loss(model(**_model_inputs(batch)).logits, batch["labels"])

        return loss

    generator = torch.Generator().manual_seed(config.seed)
    try:
        with torch.enable_grad():
            found = top_hessian_eigenvalues([closure(b) for b in batches], params, k=config.num_eigenvalues,
                                            max_iter=config.max_iter, tol=config.tol, generator=generator)
    finally:
        for p, flag in zip(params, saved):
            p.requires_grad_(flag)
    return HessianSummary(found.values, found.iterations, found.converged, sum(p.numel() for p in params))


def enabled(config: AnalysisConfig) -> bool:
    return config.hessian.enabled


class HessianSpectrum:
    def __init__(self, setup: Setup):
        self.setup = setup
        self.config = setup.config.hessian
        self.batches: list[dict] = []

    def add(self, step: Step) -> None:
        """Keep the first ``hessian.batches`` batches, labelled (teacher's argmax, or its value for regression)."""
        if len(self.batches) >= self.config.batches:
            return
        labelled = dict(step.batch)
        if "labels" not in labelled:
            logits = step.taps["teacher"].logits
            labelled["labels"] = logits.squeeze(-1) if logits.shape[-1] == 1 else logits.argmax(-1)
        self.batches.append(labelled)

    def finish(self, result: AnalysisResult) -> None:
        for name in self.config.models:
            if name in self.setup.models:
                result.hessian[name] = hessian_of_model(self.setup.models[name], self.batches, self.config,
                                                        self.setup.device)


def write(result: AnalysisResult, report: Report) -> None:
    if result.hessian:
        rows = [{"model": m, "rank": r + 1, "eigenvalue": v, "iterations": s.iterations[r],
                 "converged": s.converged[r], "num_params": s.num_params}
                for m, s in result.hessian.items() for r, v in enumerate(s.values)]
        report.csv("hessian.csv", ["model", "rank", "eigenvalue", "iterations", "converged", "num_params"], rows)
        report.png("hessian.png", plots.eigenvalue_bars({m: s.values for m, s in result.hessian.items()}))
    report.summary["hessian"] = {m: {"eigenvalues": s.values, "iterations": s.iterations, "converged": s.converged,
                                     "num_params": s.num_params} for m, s in result.hessian.items()}
