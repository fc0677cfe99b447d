"""Recipes: which loss terms pull on the student, and the objective that evaluates them on taps.

A recipe maps a :class:`DistillConfig` to ``{term: coefficient}``; the objective multiplies each
coefficient by the term's weight (``config.weights``), drops zero terms, and sums

    loss = Σ_term coefficient · weight · value(term),

where a per-layer term's value is the *sum* over the selected layers of its per-layer loss (TernaryBERT's
Σ_l form). ``layer_output`` covers the embedding output ``X_0`` (if ``layers.include_embedding``) and
``X_{l+1}`` of each selected layer ``l``.

Terms and their losses (classification / regression):

==================  ==========================  =====================  ==========================
term                tap                         loss                   per layer
==================  ==========================  =====================  ==========================
pred                logits                      soft_cross_entropy(τ)  / logits_mse
ground_truth        logits, labels              ground_truth_cross_entropy / ground_truth_mse
layer_output        layer_outputs               layer_output_mse       yes
attention_score     attention_scores            attention_score_mse    yes
attention_map       attention_maps              attention_map_kl(τ_m)  yes
attention_output    attention_outputs           attention_output_mse   yes
mha_output          mha_outputs                 mha_output_mse         yes
context             contexts                    context_mse            yes
==================  ==========================  =====================  ==========================
"""

from __future__ import annotations

from typing import Callable, Literal, Optional

import torch

from ds_kdqat.errors import ConfigError
from ds_kdqat.models.taps import EncoderTaps

from . import losses
from .config import DistillConfig

TaskType = Literal["classification", "regression"]

TERM_TAPS: dict[str, str] = {
    "pred": "logits",
    "ground_truth": "logits",
    "layer_output": "layer_outputs",
    "attention_score": "attention_scores",
    "attention_map": "attention_maps",
    "attention_output": "attention_outputs",
    "mha_output": "mha_outputs",
    "context": "contexts",
}
PER_LAYER_TERMS = {
    "attention_score": losses.attention_score_mse,
    "attention_map": losses.attention_map_kl,
    "attention_output": losses.attention_output_mse,
    "mha_output": losses.mha_output_mse,
    "context": losses.context_mse,
}

# Recipe name -> function giving {term: coefficient} (before weights).
RECIPES: dict[str, Callable[[DistillConfig], dict[str, float]]] = {}


def register_recipe(*names: str):
    def decorate(fn: Callable[[DistillConfig], dict[str, float]]) -> Callable[[DistillConfig], dict[str, float]]:
        for name in names:
            RECIPES[name] = fn
        return fn

    return decorate


@register_recipe("ternarybert")
def _ternarybert(config: DistillConfig) -> dict[str, float]:
    return {"pred": 1.0, "layer_output": 1.0, "attention_score": 1.0}


@register_recipe("map")
def _map(config: DistillConfig) -> dict[str, float]:
    return {"pred": 1.0, "layer_output": 1.0, "attention_map": 1.0}


@register_recipe("output")
def _output(config: DistillConfig) -> dict[str, float]:
    return {"pred": 1.0, "layer_output": 1.0, "attention_output": 1.0}


@register_recipe("map_output")
def _map_output(config: DistillConfig) -> dict[str, float]:
    if config.unified == "SM1":  # map + γ·output
        return {"pred": 1.0, "layer_output": 1.0, "attention_map": 1.0, "attention_output": config.gamma}
    return {"pred": 1.0, "layer_output": 1.0, "attention_output": 1.0, "attention_map": config.gamma}


@register_recipe("custom")
def _custom(config: DistillConfig) -> dict[str, float]:
    return {term: 1.0 for term in config.terms}


@register_recipe("ti_map", "ti_output", "ti_gradual")
def _teacher_intervention(config: DistillConfig) -> dict[str, float]:
    return RECIPES[config.ti.kd_recipe](config)


def term_coefficients(config: DistillConfig) -> dict[str, float]:
    """{term: coefficient · weight} of the terms that take part (non-zero), in a stable order."""
    base = dict(RECIPES[config.recipe](config))
    base.setdefault("ground_truth", 1.0)  # on when its weight > 0
    weighted = {term: coefficient * getattr(config.weights, term) for term, coefficient in base.items()}
    return {term: value for term, value in weighted.items() if value != 0.0}


class DistillObjective:
    """The KD loss of one recipe over student and teacher taps.

    ``required_taps``: tap names both forwards must record; ``record_layers``: the layer indices whose
    per-layer taps are needed (pass as ``forward_with_taps(..., layers=objective.record_layers)``);
    ``coefficients``: {term: coefficient · weight}.

    Typical step (the teacher may run under ``torch.no_grad()`` or ``torch.inference_mode()``)::

        with torch.inference_mode():
            t = forward_with_taps(teacher, batch, objective.required_taps, layers=objective.record_layers)
        s = forward_with_taps(student, batch, objective.required_taps, layers=objective.record_layers)
        loss, terms = objective(s, t, batch.get("labels"))
        del s, t      # the loss graph keeps what backward needs; the taps' other tensors are freed
        loss.backward()
    """

    def __init__(self, coefficients: dict[str, float], layers: tuple[int, ...], include_embedding: bool,
                 task_type: TaskType, temperature: float, map_temperature: float):
        if not coefficients:
            raise ValueError("the objective has no term with a non-zero weight")
        self.coefficients = coefficients
        self.layers = layers
        self.include_embedding = include_embedding
        self.task_type = task_type
        self.temperature = temperature
        self.map_temperature = map_temperature
        self.required_taps = frozenset(TERM_TAPS[t] for t in coefficients) - {"logits"}
        self.record_layers = layers
        self.needs_labels = "ground_truth" in coefficients

    def term_value(self, term: str, student: EncoderTaps, teacher: EncoderTaps,
                   labels: Optional[torch.Tensor]) -> torch.Tensor:
        """The unweighted value of ``term``."""
        mask = student.attention_mask
        if term == "pred":
            if student.logits is None or teacher.logits is None:
                raise ValueError("term 'pred' needs logits; the model has no task head")
            if self.task_type == "regression":
                return losses.logits_mse(student.logits, teacher.logits)
            return losses.soft_cross_entropy(student.logits, teacher.logits, self.temperature)
        if term == "ground_truth":
            if labels is None:
                raise ValueError("term 'ground_truth' (weights.ground_truth > 0) needs labels")
            if self.task_type == "regression":
                return losses.ground_truth_mse(student.logits, labels)
            return losses.ground_truth_cross_entropy(student.logits, labels)
        if term == "layer_output":
            indices = ([0] if self.include_embedding else []) + [l + 1 for l in self.layers]
            return sum(losses.layer_output_mse(student.get("layer_outputs", i), teacher.get("layer_outputs", i),
                                               mask) for i in indices)
        fn = PER_LAYER_TERMS[term]
        tap = TERM_TAPS[term]
        extra = {"temperature": self.map_temperature} if term == "attention_map" else {}
        return sum(fn(student.get(tap, l), teacher.get(tap, l), mask, **extra) for l in self.layers)

    def __call__(self, student: EncoderTaps, teacher: EncoderTaps,
                 labels: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, terms): terms holds each term's unweighted value and ``total`` (= loss), all detached."""
        total = None
        terms: dict[str, torch.Tensor] = {}
        for term, coefficient in self.coefficients.items():
            value = self.term_value(term, student, teacher, labels)
            terms[term] = value.detach()
            total = coefficient * value if total is None else total + coefficient * value
        terms["total"] = total.detach()
        return total, terms


def build_objective(config: DistillConfig, num_layers: int, task_type: TaskType = "classification",
                    path: str = "distill") -> DistillObjective:
    """The objective of ``config`` for a model with ``num_layers`` transformer layers."""
    config.validate(path)
    if task_type not in ("classification", "regression"):
        raise ValueError(f"task_type must be 'classification' or 'regression', got {task_type!r}")
    coefficients = term_coefficients(config)
    if not coefficients:
        raise ConfigError(f"{path}.weights", f"every term of recipe \"{config.recipe}\" has weight 0")
    layers = config.layers.resolve(num_layers, f"{path}.layers")
    return DistillObjective(coefficients, layers, config.layers.include_embedding, task_type,
                            config.temperature, config.map_temperature)
