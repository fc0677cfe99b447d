"""Recipes: compositions of loss terms with coefficients, and the objective that evaluates them on taps.

A recipe maps a :class:`DistillConfig` to ``{term: coefficient}`` over the registered terms
(:data:`ds_kdqat.distill.terms.TERMS`); the objective adds the terms that are in every recipe
(``ground_truth``) with coefficient 1, multiplies each coefficient by the term's weight (``config.weights``),
drops zero terms, and sums

    loss = Σ_term coefficient · weight · value(term),

where a per-layer term's value is the *sum* over the selected layers of its per-layer loss (TernaryBERT's
Σ_l form); :mod:`ds_kdqat.distill.terms` says which taps each term reads and how it treats padding.

=============  ====================================================================================
recipe         terms (coefficient 1 unless given)
=============  ====================================================================================
ternarybert    pred, layer_output, attention_score
map            pred, layer_output, attention_map
output         pred, layer_output, attention_output
map_output     pred, layer_output + SM1: attention_map, γ·attention_output / SM2: attention_output,
               γ·attention_map
custom         the terms listed in ``distill.terms`` (any registered term)
ti_map,        Teacher Intervention (:mod:`ds_kdqat.distill.schedule`) with the terms of ``ti.kd_recipe``;
ti_output,     each TI phase adds its internal term on the intervened layers (``ti_output``:
ti_gradual     ``ti_mha_output``; ``ti_map``: ``ti_attention_map``; see :mod:`ds_kdqat.distill.terms`)
=============  ====================================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Callable, Literal, Optional

import torch

from ds_kdqat.errors import ConfigError
from ds_kdqat.models.taps import EncoderTaps

from .precision import fp32_term
from .terms import TERMS, Term, TermContext, intervention_terms

if TYPE_CHECKING:
    from .config import DistillConfig

TaskType = Literal["classification", "regression", "qa"]
Composition = Callable[["DistillConfig"], dict[str, float]]


@dataclass(frozen=True)
class Recipe:
    """A named composition ``config -> {term: coefficient}``; ``teacher_intervention``: the recipe runs a
    Teacher-Intervention step first (its terms are those of ``ti.kd_recipe``)."""

    name: str
    compose: Composition
    teacher_intervention: bool = False

    def __call__(self, config: "DistillConfig") -> dict[str, float]:
        return self.compose(config)


# recipe name -> record, in registration order (the order error messages list them in)
RECIPES: dict[str, Recipe] = {}


def register_recipe(*names: str, teacher_intervention: bool = False) -> Callable[[Composition], Composition]:
    """Decorator: register the decorated ``config -> {term: coefficient}`` function under each of ``names``."""

    def decorate(fn: Composition) -> Composition:
        for name in names:
            if name in RECIPES:
                raise ValueError(f"recipe {name!r} is registered twice")
            RECIPES[name] = Recipe(name, fn, teacher_intervention)
        return fn

    return decorate


def kd_recipe_names() -> tuple[str, ...]:
    """Recipes that are a loss (allowed as ``ti.kd_recipe``): all but the Teacher-Intervention ones."""
    return tuple(name for name, recipe in RECIPES.items() if not recipe.teacher_intervention)


@register_recipe("ternarybert")
def _ternarybert(config: "DistillConfig") -> dict[str, float]:
    return {"pred": 1.0, "layer_output": 1.0, "attention_score": 1.0}


@register_recipe("map")
def _map(config: "DistillConfig") -> dict[str, float]:
    return {"pred": 1.0, "layer_output": 1.0, "attention_map": 1.0}


@register_recipe("output")
def _output(config: "DistillConfig") -> dict[str, float]:
    return {"pred": 1.0, "layer_output": 1.0, "attention_output": 1.0}


@register_recipe("map_output")
def _map_output(config: "DistillConfig") -> dict[str, float]:
    if config.unified == "SM1":  # map + γ·output
        return {"pred": 1.0, "layer_output": 1.0, "attention_map": 1.0, "attention_output": config.gamma}
    return {"pred": 1.0, "layer_output": 1.0, "attention_output": 1.0, "attention_map": config.gamma}


@register_recipe("custom")
def _custom(config: "DistillConfig") -> dict[str, float]:
    return {term: 1.0 for term in config.terms}


@register_recipe("ti_map", "ti_output", "ti_gradual", teacher_intervention=True)
def _teacher_intervention(config: "DistillConfig") -> dict[str, float]:
    return RECIPES[config.ti.kd_recipe](config)


def term_coefficients(config: "DistillConfig") -> dict[str, float]:
    """{term: coefficient · weight} of the terms that take part (non-zero), in a stable order."""
    base = dict(RECIPES[config.recipe](config))
    unknown = [term for term in base if term not in TERMS]
    if unknown:
        raise ValueError(f"recipe {config.recipe!r} names unregistered loss terms {unknown}")
    internal = [term for term in base if TERMS[term].intervention is not None]
    if internal:
        raise ValueError(f"recipe {config.recipe!r} names internal Teacher-Intervention terms {internal}; "
                         "they are added to their phase by build_objective(phase=...)")
    for name, term in TERMS.items():
        if term.in_every_recipe:
            base.setdefault(name, 1.0)  # on when its weight > 0
    weighted = {term: coefficient * config.weights.weight(term) for term, coefficient in base.items()}
    return {term: value for term, value in weighted.items() if value != 0.0}


def _call_term(loss, ctx: TermContext, student, teacher):
    return loss(student, teacher, ctx)


class DistillObjective:
    """The KD loss of one recipe over student and teacher taps.

    ``required_taps``: tap names both forwards must record; ``record_layers``: the layer indices whose
    per-layer taps are needed (pass as ``forward_with_taps(..., layers=objective.record_layers)``);
    ``coefficients``: {term: coefficient · weight}; ``term_layers``: {term: layers} for the per-layer terms
    that use other layers than ``layers`` (the internal Teacher-Intervention terms: the intervened layers).

    Typical step (the teacher may run under ``torch.no_grad()`` or ``torch.inference_mode()``)::

        with torch.inference_mode():
            t = forward_with_taps(teacher, batch, objective.required_taps, layers=objective.record_layers)
        s = forward_with_taps(student, batch, objective.required_taps, layers=objective.record_layers)
        loss, terms = objective(s, t, batch.get("labels"))
        del s, t      # the loss graph keeps what backward needs; the taps' other tensors are freed
        loss.backward()
    """

    def __init__(self, coefficients: dict[str, float], layers: tuple[int, ...], include_embedding: bool,
                 task_type: TaskType, temperature: float, map_temperature: float,
                 term_layers: Optional[dict[str, tuple[int, ...]]] = None):
        if not coefficients:
            raise ValueError("the objective has no term with a non-zero weight")
        self.coefficients = coefficients
        self.layers = layers
        self.term_layers = {term: tuple(chosen) for term, chosen in (term_layers or {}).items() if term in coefficients}
        self.include_embedding = include_embedding
        self.task_type = task_type
        self.temperature = temperature
        self.map_temperature = map_temperature
        self.terms: dict[str, Term] = {name: TERMS[name] for name in coefficients}
        self.required_taps = frozenset(term.tap for term in self.terms.values()) - {"logits"}
        self.record_layers = tuple(sorted(set(layers).union(*self.term_layers.values())))
        self.needs_labels = any(term.needs_labels for term in self.terms.values())

    def term_value(self, term: str, student: EncoderTaps, teacher: Optional[EncoderTaps],
                   labels: Optional[torch.Tensor]) -> torch.Tensor:
        """The unweighted value of ``term``, computed in fp32 whatever the student's dtype (DeepSpeed bf16/fp16)
        and the teacher's (``kdqat.model.teacher_precision``): :func:`~ds_kdqat.distill.precision.fp32_term` (fp32
        taps are used as they are)."""
        spec = self.terms[term]
        if spec.needs_labels and labels is None:
            raise ValueError(f"term {term!r} (weights.{term} > 0) needs labels")
        ctx = TermContext(student.attention_mask, labels, self.task_type, self.temperature, self.map_temperature)
        loss = partial(_call_term, spec.loss, ctx)
        if not spec.per_layer:
            return fp32_term(loss, getattr(student, spec.tap), None if teacher is None else getattr(teacher, spec.tap))
        layers = self.term_layers.get(term, self.layers)
        return sum(fp32_term(loss, student.get(spec.tap, i), teacher.get(spec.tap, i))
                   for i in spec.indices(layers, self.include_embedding))

    def __call__(self, student: EncoderTaps, teacher: Optional[EncoderTaps],
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


def build_objective(config: "DistillConfig", num_layers: int, task_type: TaskType = "classification",
                    path: str = "distill", phase: Optional[str] = None) -> DistillObjective:
    """The objective of ``config`` for a model with ``num_layers`` transformer layers.

    ``phase``: a Teacher-Intervention phase (``"ti_output"``, ``"ti_map"``) adds its internal terms
    (:func:`~ds_kdqat.distill.terms.intervention_terms`) on the intervened layers ``config.ti.layers``, each
    with coefficient ``weights.<term>`` (left out at 0); None or a KD phase: the recipe's terms only.
    """
    config.validate(path)
    if task_type not in ("classification", "regression", "qa"):
        raise ValueError(f"task_type must be 'classification', 'regression' or 'qa', got {task_type!r}")
    coefficients = term_coefficients(config)
    term_layers = {}
    if phase is not None and config.is_teacher_intervention:
        intervened = config.ti.layers.resolve(num_layers, f"{path}.ti.layers")
        for term in intervention_terms(phase):
            weight = config.weights.weight(term)
            if weight != 0.0:
                coefficients[term] = weight
                term_layers[term] = intervened
    if not coefficients:
        raise ConfigError(f"{path}.weights", f"every term of recipe \"{config.recipe}\" has weight 0")
    layers = config.layers.resolve(num_layers, f"{path}.layers")
    return DistillObjective(coefficients, layers, config.layers.include_embedding, task_type,
                            config.temperature, config.map_temperature, term_layers)
