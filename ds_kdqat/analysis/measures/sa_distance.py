"""SA-GEN and SA-PROP distances per (layer, head) of each compared model against the teacher.

Reduction: mean over the real tokens of all examples (``all``) and, when a special token id is given, over
the tokens equal to ``config.special_token`` (e.g. ``[SEP]``); see :mod:`ds_kdqat.analysis.decomposition`.
SA-PROP vectors ``f_h(x_j)`` come from each model's own value projection and (quantized) output weight.
Result: ``sa[model][tokens][kind]`` (L, H). Files: ``sa_distance.csv`` (model, tokens, layer, head, sa_gen,
sa_prop), ``sa_distance.png`` (head means per layer) and ``sa_distance_<TOKEN>.png`` for the special token;
``metrics.json``: ``sa_distance_per_layer[tokens][kind]`` per model.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import plots
from ..decomposition import sa_gen_distance_sums, sa_prop_distance_sums, sa_prop_vectors
from ..result import AnalysisResult
from .base import Report, RunningMeans, Setup, Step, finite_or_none

KINDS = ("sa_gen", "sa_prop")


def _model_value_and_output(model: nn.Module, layer: int) -> tuple[nn.Module, torch.Tensor]:
    """(value projection module, effective output-projection weight (D, D)) of ``layer``, from the model's
    family adapter (its ``value_role`` module and its MHA-output module)."""
    from ...models.families import adapter_for

    adapter = adapter_for(model)
    values = adapter.value_projections(model)
    if layer >= len(values):
        raise TypeError(f"{type(model).__name__}: the {adapter.family} adapter finds {len(values)} value "
                        f"projections ({adapter.value_role!r} role); layer {layer} has none")
    output = adapter.mha_output_module(adapter.layer_modules(model)[layer])
    weight = output.quantized_weight() if hasattr(output, "quantized_weight") else output.weight
    return values[layer], weight


def _sa_prop(model: nn.Module, layer: int, layer_input: torch.Tensor, heads: int) -> torch.Tensor:
    """``f_h(x_j)`` of every token of ``layer`` from the model's own value projection and output weight."""
    value, weight = _model_value_and_output(model, layer)
    return sa_prop_vectors(value(layer_input), weight, heads)


class SADistance:
    def __init__(self, setup: Setup):
        self.models, self.compared = setup.models, setup.compared
        self.token_sets = ["all"] + ([setup.config.special_token] if setup.special_token_id is not None else [])
        self.sums = RunningMeans()

    def add(self, step: Step) -> None:
        teacher = step.taps["teacher"]
        teacher_f = [_sa_prop(self.models["teacher"], l, teacher.layer_outputs[l], step.heads) for l in range(step.layers)]
        for name in self.compared:
            student = step.taps[name]
            for layer in range(step.layers):
                t_map, s_map = teacher.attention_maps[layer], student.attention_maps[layer]
                student_f = _sa_prop(self.models[name], layer, student.layer_outputs[layer], step.heads)
                for tokens in self.token_sets:
                    token_mask = None if tokens == "all" else step.special
                    total, count = sa_gen_distance_sums(t_map, s_map, step.mask, token_mask)
                    self.sums.add((name, "sa_gen", tokens, layer), total, count.expand_as(total))
                    total, count = sa_prop_distance_sums(teacher_f[layer], student_f, step.mask, token_mask)
                    self.sums.add((name, "sa_prop", tokens, layer), total, count.expand_as(total))

    def finish(self, result: AnalysisResult) -> None:
        for name in self.compared:
            result.sa[name] = {tokens: {kind: self.sums.per_layer((name, kind, tokens), result.num_layers)
                                        for kind in KINDS} for tokens in self.token_sets}


def _figure_name(tokens: str) -> str:
    """``sa_distance.png`` for all tokens, ``sa_distance_<TOKEN>.png`` (alphanumerics kept) for a special one."""
    safe = "".join(c if c.isalnum() else "_" for c in tokens).strip("_") or "special"
    return "sa_distance.png" if tokens == "all" else f"sa_distance_{safe}.png"


def write(result: AnalysisResult, report: Report) -> None:
    rows = [{"model": m, "tokens": tokens, "layer": l, "head": h, **{kind: finite_or_none(v[kind][l, h]) for kind in KINDS}}
            for m, by_tokens in result.sa.items() for tokens, v in by_tokens.items()
            for l in range(result.num_layers) for h in range(result.num_heads)]
    report.csv("sa_distance.csv", ["model", "tokens", "layer", "head", *KINDS], rows)
    for m, by_tokens in result.sa.items():
        report.model_summary(m)["sa_distance_per_layer"] = {
            tokens: {kind: [finite_or_none(x) for x in v[kind].mean(axis=1)] for kind in v} for tokens, v in by_tokens.items()}
    if result.sa:
        for tokens in next(iter(result.sa.values())):
            figure = plots.per_layer({
                f"SA-GEN distance ({tokens})": {m: v[tokens]["sa_gen"].mean(axis=1) for m, v in result.sa.items()},
                f"SA-PROP distance ({tokens})": {m: v[tokens]["sa_prop"].mean(axis=1) for m, v in result.sa.items()},
            })
            report.png(_figure_name(tokens), figure)
