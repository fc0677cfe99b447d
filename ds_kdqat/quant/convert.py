"""``quantize_model``: convert an HF encoder in place by module roles (through its family adapter) or module-name
patterns, and report what changed."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import nn

from ds_kdqat.errors import ConfigError
from ds_kdqat.models.attention import self_attention_modules, use_kdqat_attention
from ds_kdqat.models.families import adapter_for
from ds_kdqat.quant.config import DEFAULT_PATH, QuantConfig, quant_config_from_dict
from ds_kdqat.quant.modules import (
    QUANT_MODULE_TYPES,
    ActQuantizer,
    QuantEmbedding,
    QuantLinear,
    WeightQuantizer,
)

CONFIG_ATTR = "kdqat_quant_config"  # the QuantConfig a model was converted with (read by export_packed)


@dataclass
class QuantEntry:
    name: str  # dotted module name
    kind: str  # "linear" | "embedding" | "attention"
    quantizer: str  # weight quantizer description (or the attention points)
    activation: str  # activation quantizer description, "-" when off
    params: int  # number of quantized weight elements (0 for attention)


@dataclass
class QuantReport:
    entries: list[QuantEntry] = field(default_factory=list)

    def of_kind(self, kind: str) -> list[QuantEntry]:
        return [e for e in self.entries if e.kind == kind]

    @property
    def quantized_params(self) -> int:
        return sum(e.params for e in self.entries)

    def table(self) -> str:
        header = ("module", "kind", "weights", "input activations", "params")
        rows = [header] + [(e.name, e.kind, e.quantizer, e.activation, f"{e.params:,}") for e in self.entries]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"{len(self.of_kind('linear'))} linear, {len(self.of_kind('embedding'))} embedding, "
                     f"{len(self.of_kind('attention'))} attention; {self.quantized_params:,} quantized weights")
        return "\n".join(lines)


def _role_sources(model: nn.Module, group, gpath: str) -> list[tuple[str, str, list[str]]]:
    """``(key path, description, regexes)`` of each of the group's roles, resolved through the model's family
    adapter; a role the family lacks is skipped in an optional group and an error otherwise."""
    if not group.roles:
        return []
    try:
        adapter = adapter_for(model)
    except ValueError as error:
        raise ConfigError(f"{gpath}.roles[0]", f"roles are resolved through the model's family adapter: {error}; "
                          "select its modules with patterns (regexes) instead") from None
    sources = []
    for k, role in enumerate(group.roles):
        if not adapter.has_role(role):
            if group.optional:
                continue
            raise ConfigError(f"{gpath}.roles[{k}]", f"the {adapter.family} family has no {role!r} module; its "
                              f"roles: {', '.join(adapter.roles)}")
        sources.append((f"{gpath}.roles[{k}]", f"role {role!r} of the {adapter.family} family",
                        adapter.role_patterns(role)))
    return sources


def _match(model: nn.Module, config: QuantConfig, path: str) -> list[tuple[str, nn.Module, int]]:
    """``(name, module, group index)`` for every matched module; errors name the group, pattern or role path.

    A group's ``patterns`` are matched first, then its ``roles`` (each resolved to regexes by the family
    adapter, :meth:`~ds_kdqat.models.families.FamilyAdapter.role_patterns`)."""
    resolved = config.resolved()
    modules = [(name, m) for name, m in model.named_modules() if name]
    owner: dict[str, int] = {}
    found: list[tuple[str, nn.Module, int]] = []
    for i, group in enumerate(resolved.groups):
        gpath = f"{path}.{resolved.groups_path}[{i}]"
        sources = [(f"{gpath}.patterns[{j}]", repr(pattern), [pattern]) for j, pattern in enumerate(group.patterns)]
        sources += _role_sources(model, group, gpath)
        for where, what, patterns in sources:
            regexes = [re.compile(pattern) for pattern in patterns]
            hits = [(name, m) for name, m in modules if any(regex.search(name) for regex in regexes)]
            if not hits and not group.optional:
                raise ConfigError(where, f"{what} matches no module of {type(model).__name__}")
            for name, module in hits:
                if name in owner and owner[name] != i:
                    raise ConfigError(where, f"{what} matches {name!r}, already matched "
                                      f"by {path}.{resolved.groups_path}[{owner[name]}]")
                if name in owner:
                    continue
                if isinstance(module, QUANT_MODULE_TYPES):
                    raise ConfigError(where, f"{name!r} is already quantized; quantize a fresh "
                                      "copy of the full-precision model")
                if type(module) is nn.Embedding and group.act_bits is not None:
                    raise ConfigError(f"{gpath}.act_bits", f"{name!r} is an embedding (its input is token ids); "
                                      "expected null")
                if type(module) not in (nn.Linear, nn.Embedding):
                    raise ConfigError(where, f"{what} matches {name!r} of type "
                                      f"{type(module).__name__}; expected nn.Linear or nn.Embedding modules")
                if group.granularity == "row" and module.weight.dim() != 2:
                    raise ConfigError(f"{gpath}.granularity", f"row-wise needs 2-D weights; {name!r} has "
                                      f"{tuple(module.weight.shape)}")
                owner[name] = i
                found.append((name, module, i))
    return found


def _weight_count(weight: torch.Tensor) -> int:
    shape = getattr(weight, "ds_shape", None)  # ZeRO-3 partitioned parameter: its full shape
    return int(torch.Size(shape).numel()) if shape is not None else weight.numel()


def quantize_model(model: nn.Module, config: Union[QuantConfig, dict, None] = None,
                   path: str = DEFAULT_PATH) -> QuantReport:
    """Convert ``model`` in place: quantized linears/embeddings per group, activation quantizers in attention.

    ``config``: a :class:`QuantConfig`, a ``kdqat.quant`` dict, or None for the default (TernaryBERT
    W2-E2-A8). Groups' ``roles`` are resolved through the model's family adapter (``adapter_for(model)``),
    ``patterns`` against its module names. Everything is validated and matched before the first module changes,
    so an error leaves the model as it was. Routes attention through the kdqat function
    (:func:`use_kdqat_attention`), records the config on the model (``model.kdqat_quant_config``) and returns the
    report of converted modules.
    Call it before ``deepspeed.initialize`` (ZeRO-3 models built under ``zero.Init`` are fine).
    """
    if config is None:
        config = QuantConfig()
    elif isinstance(config, dict):
        config = quant_config_from_dict(config, path)
    config.validate(path)
    resolved = config.resolved()
    matched = _match(model, config, path)
    attention_on = resolved.attention.bits is not None and bool(resolved.attention.points)
    attention_modules = self_attention_modules(model)
    if attention_on and not attention_modules:
        raise ConfigError(f"{path}.attention", f"{type(model).__name__} has no self-attention module using HF's "
                          "attention interface; set bits to null")
    if attention_modules:
        use_kdqat_attention(model)

    report = QuantReport()
    # linears of one group under one parent (Q, K, V) share an input quantizer: their common input is
    # quantized once
    shared_act: dict[tuple[str, int], ActQuantizer] = {}
    for name, module, i in matched:
        group = resolved.groups[i]
        weight_quant = WeightQuantizer.from_group(group, resolved.lat)
        params = _weight_count(module.weight)
        if type(module) is nn.Linear:
            act = None
            if group.act_bits is not None:
                act = shared_act.setdefault((name.rpartition(".")[0], i), ActQuantizer(
                    group.act_bits, group.act_mode, group.act_clip, shared=True, method=group.act_method))
            QuantLinear.convert(module, weight_quant, act)
            integer = config.integer_forward and integer_forward_possible(weight_quant, act)
            module.__dict__["integer_forward"] = integer
            report.entries.append(QuantEntry(name, "linear", weight_quant.describe(),
                                             (act.describe() if act else "-") + (", int8 GEMM" if integer else ""),
                                             params))
        else:
            QuantEmbedding.convert(module, weight_quant)
            report.entries.append(QuantEntry(name, "embedding", weight_quant.describe(), "-", params))

    if attention_on:
        att = resolved.attention
        names = {id(m): n for n, m in model.named_modules()}
        for module in attention_modules:
            module.kdqat_act_quant = nn.ModuleDict(
                {point: ActQuantizer(att.bits, att.mode, att.clip, method=att.method) for point in att.points})
            describe = ActQuantizer(att.bits, att.mode, att.clip, method=att.method).describe()
            report.entries.append(QuantEntry(names[id(module)], "attention", "+".join(att.points), describe, 0))
    order = {name: k for k, (name, _) in enumerate(model.named_modules())}
    report.entries.sort(key=lambda e: order[e.name])
    if config.integer_forward and not any(e.activation.endswith("int8 GEMM") for e in report.entries):
        raise ConfigError(f"{path}.integer_forward", "no quantized linear has an int8 form (it needs activation "
                          "codes of 8 bits or fewer and ternary, binary or symmetric weight codes of 8 bits or "
                          "fewer); set it to false")
    setattr(model, CONFIG_ATTR, config)
    return report


def integer_forward_possible(weight_quant: WeightQuantizer, act: Optional[ActQuantizer]) -> bool:
    """Whether a linear's codes have int8 forms (:mod:`ds_kdqat.quant.integer`): activation codes of at most 8
    bits (uniform or LSQ) and weight codes of at most 8 bits without a shift."""
    if act is None or act.bits > 8 or act.method not in ("uniform", "lsq"):
        return False
    return weight_quant.bits <= 8 and weight_quant.kind in ("ternary", "binary", "symmetric")


def model_quant_config(model: nn.Module) -> Optional[QuantConfig]:
    return getattr(model, CONFIG_ATTR, None)


@torch.no_grad()
def quantized_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """``"<module>.weight"`` → the fake-quantized weight the forward uses, for every quantized module."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, QUANT_MODULE_TYPES):
            out[f"{name}.weight"] = module.weight_quant(module.weight).detach()
    return out
