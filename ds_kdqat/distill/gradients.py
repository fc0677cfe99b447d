"""Which trainable student parameters a phase's loss can reach: the check behind the "no gradient" warning.

A parameter *can receive gradient* in a phase when the phase's loss depends on it through autograd: its
``AccumulateGrad`` node is reachable from ``loss.grad_fn``. :func:`unreached_parameters` finds the trainable
parameters that are not, by walking the graph of one micro batch's loss; nothing is computed, no hook runs and
no ``.grad`` changes, so the check does not alter training (the engine runs it on the first micro batch of each
phase, before that batch's backward). A teacher tensor written into the student's forward is detached, so
whatever only feeds the replaced tensor is cut off exactly as it is in the backward.

Some parameters are left without gradient on purpose; :func:`frozen_on_purpose` names them with the reason:

* a phase whose objective has no term on the logits (e.g. the first stage of TernaryBERT's SQuAD schedule):
  the task head (parameters outside the encoder, and the pooler);
* a TI-M phase: the student's attention-map activation quantizer at the intervened layers — the teacher's map
  replaces the student's and is used as given, so that quantizer is not applied (see
  :mod:`ds_kdqat.models.attention`; it has parameters only with a learned-step method such as LSQ).

Works under every ZeRO stage: a ZeRO-3 partitioned parameter is still the leaf its module's forward used (its
data is gathered in place), so its ``AccumulateGrad`` node is in the graph — checked on CPU with DeepSpeed 0.19
at stages 2 and 3. Two cases cannot be judged and :func:`graph_check_possible` / :func:`phase_gradient_report`
say so (the engine then skips the check with a DEBUG note): reentrant activation checkpointing (its segments run
without autograd in the forward and are graphed only in the backward) and a graph that reaches no trainable
parameter at all (whatever the reason, e.g. a partitioning scheme that hides the parameters: rather no verdict than
a false alarm). The non-reentrant checkpointing of ``kdqat.train.activation_checkpointing``
(:mod:`ds_kdqat.models.checkpointing`) builds the whole graph in the forward and only drops its saved tensors;
the walk reads no saved tensor, so it triggers no recomputation and judges exactly as without checkpointing.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

import torch
from torch import nn

from .terms import TERMS


def reached_leaves(loss: torch.Tensor) -> set[int]:
    """``id`` of every leaf tensor whose gradient a backward of ``loss`` would accumulate."""
    reached: set[int] = set()
    seen: set = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad
        if variable is not None:
            reached.add(id(variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return reached


def unreached_parameters(loss: torch.Tensor, model: nn.Module) -> list[str]:
    """Names of ``model``'s trainable parameters that ``loss`` does not depend on (in ``named_parameters``
    order). A loss without a graph reaches none."""
    reached = reached_leaves(loss) if loss.requires_grad else set()
    return [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in reached]


def _head_parameters(model: nn.Module) -> dict[str, str]:
    from ds_kdqat.models.families import adapter_for

    base = getattr(model, "base_model", model)
    prefix = getattr(model, "base_model_prefix", "")
    encoder = {id(p) for p in base.parameters()} if base is not model else set()
    try:
        poolers = [m for _, m in adapter_for(model).role_modules(model, "pooler")]
    except (KeyError, ValueError):
        poolers = []
    pooled = {id(p) for m in poolers for p in m.parameters()}
    why = "no term of this phase reads the logits, so the task head (and pooler) is not trained in it"
    return {name: why for name, p in model.named_parameters()
            if (id(p) not in encoder and not (prefix and name.startswith(prefix + "."))) or id(p) in pooled}


def frozen_on_purpose(phase, model: nn.Module) -> dict[str, str]:
    """{parameter name: why} of the trainable parameters ``phase`` (a :class:`~ds_kdqat.distill.phases.Phase`)
    leaves without gradient by design (see the module docstring)."""
    model = getattr(model, "module", model)
    frozen: dict[str, str] = {}
    coefficients = getattr(phase.objective, "coefficients", None)
    if coefficients is not None and not any(TERMS[t].tap == "logits" for t in coefficients if t in TERMS):
        frozen.update(_head_parameters(model))
    if phase.name == "ti_map" and phase.intervene_layers:
        from ds_kdqat.models.attention import self_attention_modules

        ids = {}
        modules = self_attention_modules(model)
        for layer in phase.intervene_layers:
            quantizers = getattr(modules[layer], "kdqat_act_quant", None) if layer < len(modules) else None
            if quantizers is not None and "map" in quantizers:
                ids.update({id(p): layer for p in quantizers["map"].parameters()})
        why = ("TI-M: the teacher's attention map replaces the student's and is not quantized by the student's map "
               "quantizer")
        frozen.update({name: why for name, p in model.named_parameters() if id(p) in ids})
    parameters = dict(model.named_parameters())
    return {name: why for name, why in frozen.items() if parameters[name].requires_grad}


def graph_check_possible(model: nn.Module) -> Optional[str]:
    """None when :func:`unreached_parameters` can judge ``model`` (a module or a DeepSpeed engine) from its
    forward's graph, else why not (reentrant activation checkpointing)."""
    from ds_kdqat.models.checkpointing import layer_checkpointing

    kwargs = layer_checkpointing(getattr(model, "module", model))
    if kwargs is not None and kwargs.get("use_reentrant") is not False:
        return "reentrant activation checkpointing builds the layers' graph only in the backward"
    return None


def compact_names(names: Iterable[str]) -> list[str]:
    """Parameter names with their layer number folded: ``a.layer.0.b``, ``a.layer.1.b`` → ``a.layer.{0,1}.b``
    (patterns in first-seen order; a name with several numbers is kept as it is)."""
    groups: dict[str, list[str]] = {}
    originals: dict[str, list[str]] = {}
    number = re.compile(r"(?<=\.)\d+(?=\.)")
    for name in names:
        pattern = number.sub("{}", name)
        groups.setdefault(pattern, []).extend(number.findall(name))
        originals.setdefault(pattern, []).append(name)
    out = []
    for pattern, numbers in groups.items():
        if pattern.count("{}") == 1 and len(set(numbers)) > 1:
            out.append(pattern.replace("{}", "{" + ",".join(dict.fromkeys(numbers)) + "}"))
        else:
            out.extend(originals[pattern])
    return out


def phase_gradient_report(loss: torch.Tensor, model: nn.Module, phase) -> tuple[list[str], dict[str, str]]:
    """(trainable parameters without gradient in ``phase`` that no rule explains, {parameter: why} of those
    left without gradient on purpose) from one micro batch's ``loss`` of ``phase``.

    ValueError when the graph reaches no trainable parameter at all (nothing can be judged from it)."""
    inner = getattr(model, "module", model)
    missing = unreached_parameters(loss, inner)
    trainable = [name for name, p in inner.named_parameters() if p.requires_grad]
    if trainable and len(missing) == len(trainable):
        raise ValueError("the loss's graph reaches none of the model's trainable parameters; cannot tell which "
                         "of them get gradient")
    expected = frozen_on_purpose(phase, inner)
    return [name for name in missing if name not in expected], {n: w for n, w in expected.items() if n in missing}
