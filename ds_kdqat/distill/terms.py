"""KD loss terms: one record per term, registered in ``TERMS`` — the single source that recipes, config
validation (``distill.terms``, ``distill.weights`` keys) and the docs (:func:`describe_terms`) read.

A term names the tap both forwards must record, whether it is per layer, the loss that compares the student's
tensor with the teacher's, and how padding is kept out of it. Its value in the objective is

* whole-model terms: ``loss(student.<tap>, teacher.<tap>, context)``;
* per-layer terms: ``Σ_l loss(student.<tap>[i_l], teacher.<tap>[i_l], context)`` over the selected layers
  ``l`` with ``i_l = l + layer_offset``, plus index 0 (the embedding output) for terms with ``embedding``
  when ``layers.include_embedding`` (TernaryBERT's L+1 layer outputs).

The loss receives a :class:`TermContext` (attention mask, labels, task type, temperatures). Built-in terms
(losses in :mod:`ds_kdqat.distill.losses`):

==================  ==================  =========  ================================================
term                tap                 per layer  loss
==================  ==================  =========  ================================================
pred                logits              no         soft_cross_entropy(τ) / logits_mse (regression)
ground_truth        logits + labels     no         ground_truth_cross_entropy / ground_truth_mse
layer_output        layer_outputs       yes (+X₀)  layer_output_mse
attention_score     attention_scores    yes        attention_score_mse
attention_map       attention_maps      yes        attention_map_kl(τ_map)
attention_output    attention_outputs   yes        attention_output_mse
mha_output          mha_outputs         yes        mha_output_mse
context             contexts            yes        context_mse
ti_mha_output       mha_outputs         TI layers  mha_output_mse   (internal term of TI-O phases)
ti_attention_map    attention_maps      TI layers  attention_map_kl (internal term of TI-M phases)
==================  ==================  =========  ================================================

``ground_truth`` takes part in every recipe (``in_every_recipe``) and has default weight 0, so it is off
until ``weights.ground_truth > 0``; every other term has default weight 1.

*Internal terms* of Teacher Intervention (``intervention`` names their phase): in a TI phase the teacher's
tensor replaces the student's at the intervened layers (``distill.ti.layers``) and is what flows on, so the
student's own tensor at that point reaches no other loss. The phase's internal term compares that own tensor
(recorded before the replacement) with the teacher's, at the intervened layers, so the parameters that
produce it keep training — the paper's "the computation within the MHA sub-layer is quantized for internal
distillation":

* ``ti_mha_output`` (TI-O, phase ``ti_output``): MSE of the student's own MHA output
  ``Concat(student context)·W_O + b_O`` with the teacher's (trains W_Q, W_K, W_V, W_O and their biases and
  activation quantizers, which TI-O otherwise cuts off);
* ``ti_attention_map`` (TI-M, phase ``ti_map``): KL(teacher ‖ student) of the student's own attention map
  (τ_map) (trains W_Q, W_K, which TI-M otherwise cuts off unless the KD recipe has a score or map term).

They are added to their phase automatically with coefficient 1 × ``weights.<term>`` (default 1; 0 switches
the term off) and cannot be listed in ``distill.terms`` or stages.

Adding a term: decorate a function ``(student, teacher, ctx) -> scalar`` with :func:`register_term` in a
new module ``ds_kdqat/distill/terms_<name>.py`` (imported automatically with this one) or in any module
imported before the config is read; then name it in ``distill.terms`` (recipe ``custom``) and ``weights``.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import losses

Tensor = torch.Tensor


@dataclass(frozen=True)
class TermContext:
    """What a term's loss may use besides the two tensors.

    ``attention_mask``: (B, S), 1/True = real token; ``labels``: (B,) or None; ``task_type``:
    ``"classification"`` or ``"regression"``; ``temperature``: of the soft cross-entropy; ``map_temperature``:
    of the attention-map KL.
    """

    attention_mask: Optional[Tensor]
    labels: Optional[Tensor]
    task_type: str
    temperature: float
    map_temperature: float


TermLoss = Callable[[Optional[Tensor], Optional[Tensor], TermContext], Tensor]


@dataclass(frozen=True)
class Term:
    """One KD loss term (see the module docstring for how the objective evaluates it).

    ``tap``: the :class:`~ds_kdqat.models.taps.EncoderTaps` field both forwards record (``logits`` is always
    there); ``loss``: ``(student tensor, teacher tensor, context) -> scalar``; ``padding``: how padded
    positions / rows are excluded (documentation, shown by :func:`describe_terms`); ``per_layer``,
    ``layer_offset``, ``embedding``: which tap entries it sums over; ``needs_labels``: the step must pass
    labels; ``in_every_recipe``: every recipe includes it (with coefficient 1, so its weight decides);
    ``default_weight``: its weight when ``distill.weights`` does not name it; ``summary``: one line for docs;
    ``intervention``: the Teacher-Intervention phase (``"ti_output"``/``"ti_map"``) whose internal term this is
    (added to that phase only, on the intervened layers; see the module docstring), None for recipe terms.
    """

    name: str
    tap: str
    loss: TermLoss
    padding: str
    per_layer: bool = False
    layer_offset: int = 0
    embedding: bool = False
    needs_labels: bool = False
    in_every_recipe: bool = False
    default_weight: float = 1.0
    summary: str = ""
    intervention: Optional[str] = None

    def indices(self, layers: tuple[int, ...], include_embedding: bool) -> list[int]:
        """Tap indices a per-layer term sums over, for the selected ``layers``."""
        return ([0] if self.embedding and include_embedding else []) + [l + self.layer_offset for l in layers]


# term name -> record, in registration order (the order docs and error messages list them in)
TERMS: dict[str, Term] = {}


def register_term(name: str, *, tap: str, padding: str, per_layer: bool = False, layer_offset: int = 0,
                  embedding: bool = False, needs_labels: bool = False, in_every_recipe: bool = False,
                  default_weight: float = 1.0, intervention: Optional[str] = None) -> Callable[[TermLoss], TermLoss]:
    """Decorator: register the decorated loss function as term ``name`` (see :class:`Term`)."""

    def decorate(fn: TermLoss) -> TermLoss:
        if name in TERMS:
            raise ValueError(f"loss term {name!r} is registered twice")
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        if intervention is not None and (not per_layer or in_every_recipe):
            raise ValueError(f"loss term {name!r}: an internal Teacher-Intervention term is per layer and in no recipe")
        TERMS[name] = Term(name, tap, fn, padding, per_layer, layer_offset, embedding, needs_labels,
                           in_every_recipe, default_weight, summary, intervention)
        return fn

    return decorate


def describe_terms() -> str:
    """A Markdown table of the registered terms (name, tap, per layer, default weight, padding, summary)."""
    rows = ["| term | tap | per layer | default weight | padding | loss |", "|---|---|---|---|---|---|"]
    for term in TERMS.values():
        layer = ("yes, + embedding output" if term.embedding else "yes") if term.per_layer else "no"
        if term.intervention is not None:
            layer = f"intervened layers of `{term.intervention}` phases"
        tap = term.tap + (" + labels" if term.needs_labels else "")
        rows.append(f"| `{term.name}` | `{tap}` | {layer} | {term.default_weight:g} | {term.padding} | "
                    f"{term.summary} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------- built-in terms

_TOKENS = "mean over the elements of real tokens (masked by attention_mask)"


@register_term("pred", tap="logits", padding="(B, C) logits have no padding")
def pred(student: Optional[Tensor], teacher: Optional[Tensor], ctx: TermContext) -> Tensor:
    """Soft cross-entropy with the teacher's logits at temperature τ (regression: logit MSE)."""
    if student is None or teacher is None:
        raise ValueError("term 'pred' needs logits; the model has no task head")
    if ctx.task_type == "regression":
        return losses.logits_mse(student, teacher)
    return losses.soft_cross_entropy(student, teacher, ctx.temperature)


@register_term("ground_truth", tap="logits", padding="labels -100 are ignored", needs_labels=True,
               in_every_recipe=True, default_weight=0.0)
def ground_truth(student: Optional[Tensor], teacher: Optional[Tensor], ctx: TermContext) -> Tensor:
    """Cross-entropy against the labels (regression: MSE); the teacher is not used."""
    if ctx.task_type == "regression":
        return losses.ground_truth_mse(student, ctx.labels)
    return losses.ground_truth_cross_entropy(student, ctx.labels)


@register_term("layer_output", tap="layer_outputs", padding=_TOKENS, per_layer=True, layer_offset=1,
               embedding=True)
def layer_output(student: Tensor, teacher: Tensor, ctx: TermContext) -> Tensor:
    """MSE of layer outputs X_{l+1} (and the embedding output X_0)."""
    return losses.layer_output_mse(student, teacher, ctx.attention_mask)


@register_term("attention_score", tap="attention_scores", per_layer=True,
               padding="mean over the (query, key) entries that are both real tokens")
def attention_score(student: Tensor, teacher: Tensor, ctx: TermContext) -> Tensor:
    """MSE of pre-softmax attention scores."""
    return losses.attention_score_mse(student, teacher, ctx.attention_mask)


@register_term("attention_map", tap="attention_maps", per_layer=True,
               padding="KL over real keys, mean over real query rows, then heads and non-empty sequences")
def attention_map(student: Tensor, teacher: Tensor, ctx: TermContext) -> Tensor:
    """KL(teacher ‖ student) of attention maps at temperature τ_map."""
    return losses.attention_map_kl(student, teacher, ctx.attention_mask, temperature=ctx.map_temperature)


@register_term("attention_output", tap="attention_outputs", padding=_TOKENS, per_layer=True)
def attention_output(student: Tensor, teacher: Tensor, ctx: TermContext) -> Tensor:
    """MSE of attention outputs LayerNorm(X + MHA(X))."""
    return losses.attention_output_mse(student, teacher, ctx.attention_mask)


@register_term("mha_output", tap="mha_outputs", padding=_TOKENS, per_layer=True)
def mha_output(student: Tensor, teacher: Tensor, ctx: TermContext) -> Tensor:
    """MSE of MHA outputs Concat(context)·W_O + b_O."""
    return losses.mha_output_mse(student, teacher, ctx.attention_mask)


@register_term("context", tap="contexts", padding=_TOKENS + " (H·D_h values per token)", per_layer=True)
def context(student: Tensor, teacher: Tensor, ctx: TermContext) -> Tensor:
    """MSE of per-head attention contexts."""
    return losses.context_mse(student, teacher, ctx.attention_mask)


# ------------------------------------------------------------------- internal terms of Teacher Intervention


@register_term("ti_mha_output", tap="mha_outputs", padding=_TOKENS, per_layer=True, intervention="ti_output")
def ti_mha_output(student: Tensor, teacher: Tensor, ctx: TermContext) -> Tensor:
    """TI-O internal distillation: MSE of the student's own MHA output (before the teacher's replaces it)."""
    return losses.mha_output_mse(student, teacher, ctx.attention_mask)


@register_term("ti_attention_map", tap="attention_maps", per_layer=True, intervention="ti_map",
               padding="KL over real keys, mean over real query rows, then heads and non-empty sequences")
def ti_attention_map(student: Tensor, teacher: Tensor, ctx: TermContext) -> Tensor:
    """TI-M internal distillation: KL(teacher ‖ student) of the student's own attention map (τ_map)."""
    return losses.attention_map_kl(student, teacher, ctx.attention_mask, temperature=ctx.map_temperature)


def intervention_terms(phase: str) -> list[str]:
    """The internal terms of Teacher-Intervention phase ``phase`` (registration order)."""
    return [name for name, term in TERMS.items() if term.intervention == phase]


# ------------------------------------------------------------------------------------------------ plug-in terms


def _import_term_modules() -> None:
    """Import every ``ds_kdqat/distill/terms_*.py`` so that its terms are registered with the built-in ones."""
    package = __name__.rpartition(".")[0]
    for module in pkgutil.iter_modules(importlib.import_module(package).__path__):
        if module.name.startswith("terms_"):
            importlib.import_module(f"{package}.{module.name}")


_import_term_modules()
