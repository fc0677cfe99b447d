"""What a model family is to ds-kdqat: the :class:`FamilyAdapter` dataclass, its registry and lookups.

A family is a set of HF ``config.model_type`` values whose models share module names and layer structure
(BERT, RoBERTa and ELECTRA are one family). Its adapter owns everything that differs between architectures;
every other part of ds-kdqat asks the adapter and names no family:

* **roles** of its modules (:data:`ROLE_NAMES`): which linear is the query, the value, W_O, the FFN's input and
  output projections, which embedding is the word embedding, … as small regexes over dotted module names
  relative to the base model (a head prefix such as ``bert.`` may precede them). Quantization presets name
  roles; :mod:`ds_kdqat.quant.convert` resolves them through the model's adapter;
* its **attention classes**: the class names of the modules that call HF's attention interface with their own
  Q, K, V (routed through :func:`ds_kdqat.models.attention.kdqat_attention_forward`);
* where each **tap** lives: the layer list, the MHA-output module and the attention-output module ``Y_l``;
* its **input kind** (``"tokens"``, with or without ``token_type_ids``; ``"pixels"`` for image encoders);
* how its **task model** is built and loaded, and whether a checkpoint already has the task head.

Adding a family: one module in :mod:`ds_kdqat.models.families` that builds a :class:`FamilyAdapter` in a
function decorated with :func:`register_family`, imported in the package's ``__init__``, plus its test.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Literal, Mapping, Optional, Union

from torch import nn

# Per-layer roles first, then model-level ones. ``ffn_in`` may name several modules per layer (a gated FFN's
# two input projections, e.g. T5's wi_0 / wi_1).
LAYER_ROLES = ("query", "key", "value", "attention_output_projection", "ffn_in", "ffn_out")
MODEL_ROLES = ("word_embedding", "pooler")
ROLE_NAMES = LAYER_ROLES + MODEL_ROLES

InputKind = Literal["tokens", "pixels"]
INPUT_KINDS = ("tokens", "pixels")
Status = Literal["supported", "partial"]

# model_type -> adapter (several model types may share one adapter)
FAMILIES: dict[str, "FamilyAdapter"] = {}


def per_layer(layers: str, suffix: str) -> str:
    """The role regex of a module inside every layer: ``per_layer("encoder.layer", r"attention\\.self\\.query")``
    → ``encoder\\.layer\\.\\d+\\.attention\\.self\\.query``."""
    return rf"{re.escape(layers)}\.\d+\.(?:{suffix})"


def load_sequence_classifier(path: str, num_labels: int, problem_type: Optional[str] = None,
                             local_files_only: bool = False) -> nn.Module:
    """``AutoModelForSequenceClassification`` with eager attention (a new head when the checkpoint has none or
    a different number of labels)."""
    from transformers import AutoModelForSequenceClassification

    kwargs = {"problem_type": problem_type} if problem_type else {}
    return AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=num_labels, local_files_only=local_files_only, attn_implementation="eager", **kwargs)


def has_sequence_classification_head(config: Any, num_labels: int) -> bool:
    """The checkpoint was saved as a ``…ForSequenceClassification`` with ``num_labels`` outputs."""
    has_head = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    return has_head and config.num_labels == num_labels


def load_image_classifier(path: str, num_labels: int, problem_type: Optional[str] = None,
                          local_files_only: bool = False) -> nn.Module:
    """``AutoModelForImageClassification`` with eager attention."""
    from transformers import AutoModelForImageClassification

    kwargs = {"problem_type": problem_type} if problem_type else {}
    return AutoModelForImageClassification.from_pretrained(
        path, num_labels=num_labels, local_files_only=local_files_only, attn_implementation="eager", **kwargs)


def has_image_classification_head(config: Any, num_labels: int) -> bool:
    has_head = any(a.endswith("ForImageClassification") for a in (config.architectures or []))
    return has_head and config.num_labels == num_labels


def load_question_answering(path: str, local_files_only: bool = False) -> nn.Module:
    """``AutoModelForQuestionAnswering`` with eager attention (start/end logits; a new span head when the
    checkpoint has none)."""
    from transformers import AutoModelForQuestionAnswering

    return AutoModelForQuestionAnswering.from_pretrained(path, local_files_only=local_files_only,
                                                         attn_implementation="eager")


def has_question_answering_head(config: Any) -> bool:
    """The checkpoint was saved as a ``…ForQuestionAnswering``."""
    return any(a.endswith("ForQuestionAnswering") for a in (config.architectures or []))


@dataclass(frozen=True, eq=False)
class FamilyAdapter:
    """One model family (see the module docstring). Paths are dotted, as in ``nn.Module.get_submodule``.

    ``family``: its name; ``model_types``: the HF ``config.model_type`` values it serves.
    ``roles``: role name (:data:`ROLE_NAMES`) → regex or tuple of regexes over module names relative to the base
    model (``encoder\\.layer\\.\\d+\\.attention\\.self\\.query``); a family lacks the roles it does not list.
    ``value_role``: the role whose module is the analysis's value projection (``x·W_V + b_V``).
    ``attention_classes``: class names of its self-attention modules (calling HF's attention interface).
    ``layers``: the ``nn.ModuleList`` of transformer layers, relative to ``model.base_model``;
    ``mha_output``: relative to one layer, the module whose output is ``Concat(context)·W_O + b_O`` (B, S, D);
    ``attention_output``: relative to one layer, the module whose output (or, with ``attention_output_at="input"``,
    whose input: pre-LN layers, where no module outputs ``Y_l``) is the attention output ``Y_l`` (B, S, D).
    ``final_norm``: pre-LN encoders only, relative to ``model.base_model``: the encoder's final norm, whose
    output is the last layer output ``X_L`` (one rule for every pre-LN family: ``X_L`` is normalised, as a
    post-LN model's is; the un-normalised last residual stream feeds nothing but that norm). Empty: ``X_L``
    is the last layer's output.
    ``input_kind``: ``"tokens"`` (``input_ids`` (B, S), ``attention_mask``, and ``token_type_ids`` when
    ``token_type_ids``) or ``"pixels"`` (``pixel_values`` (B, C, H, W)).
    ``load_task_model(path, num_labels, problem_type, local_files_only)``: the task model (eager attention);
    ``has_task_head(config, num_labels)``: whether a checkpoint already has that task head (no fine-tuning).
    ``load_qa_model(path, local_files_only)``: the extractive-QA model (start/end logits, eager attention), None
    when the family has none; ``has_qa_head(config)``: whether a checkpoint already has the QA head.
    ``status``: ``"supported"`` (the whole pipeline) or ``"partial"`` (``note`` says what works).
    """

    family: str
    model_types: tuple[str, ...]
    roles: Mapping[str, Union[str, tuple[str, ...]]]
    attention_classes: tuple[str, ...]
    layers: str
    mha_output: str
    attention_output: str
    attention_output_at: Literal["output", "input"] = "output"
    final_norm: str = ""
    value_role: str = "value"
    input_kind: InputKind = "tokens"
    token_type_ids: bool = True
    load_task_model: Callable[..., nn.Module] = load_sequence_classifier
    has_task_head: Callable[[Any, int], bool] = has_sequence_classification_head
    load_qa_model: Optional[Callable[..., nn.Module]] = None
    has_qa_head: Optional[Callable[[Any], bool]] = None
    status: Status = "supported"
    note: str = ""
    _compiled: Mapping[str, tuple[re.Pattern, ...]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        roles = {role: (regexes,) if isinstance(regexes, str) else tuple(regexes)
                 for role, regexes in self.roles.items()}
        unknown = sorted(set(roles) - set(ROLE_NAMES))
        if unknown:
            raise ValueError(f"family {self.family!r}: unknown roles {unknown}; known: {', '.join(ROLE_NAMES)}")
        if self.value_role not in roles:
            raise ValueError(f"family {self.family!r}: value_role {self.value_role!r} is not one of its roles")
        if self.attention_output_at not in ("output", "input"):
            raise ValueError(f"family {self.family!r}: attention_output_at {self.attention_output_at!r}; "
                             "known: 'output', 'input'")
        if self.input_kind not in INPUT_KINDS:
            raise ValueError(f"family {self.family!r}: input_kind {self.input_kind!r}; known: {INPUT_KINDS}")
        object.__setattr__(self, "roles", MappingProxyType(roles))
        object.__setattr__(self, "model_types", tuple(self.model_types))
        object.__setattr__(self, "attention_classes", tuple(self.attention_classes))
        object.__setattr__(self, "_compiled", MappingProxyType(
            {role: tuple(re.compile(p) for p in self.role_patterns(role)) for role in roles}))

    # --- roles ---
    def has_role(self, role: str) -> bool:
        return role in self.roles

    def role_patterns(self, role: str) -> list[str]:
        """Full regexes (searched in dotted module names of the whole model) of ``role``; [] when the family
        lacks it."""
        return [rf"(^|\.){regex}$" for regex in self.roles.get(role, ())]

    def role_modules(self, model: nn.Module, role: str) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` of every module of ``model`` with ``role``, in model (layer) order."""
        regexes = self._compiled.get(role, ())
        return [(name, m) for name, m in model.named_modules() if name and any(r.search(name) for r in regexes)]

    def value_projections(self, model: nn.Module) -> list[nn.Module]:
        """The value projection of each layer (``x·W_V + b_V``, (B, S, D) → (B, S, D)), in layer order."""
        return [m for _, m in self.role_modules(model, self.value_role)]

    # --- taps ---
    def layer_list(self, model: nn.Module) -> nn.Module:
        """The ``nn.ModuleList`` of transformer layers."""
        base = getattr(model, "base_model", model)
        return base.get_submodule(self.layers)


    def final_norm_module(self, model: nn.Module) -> Optional[nn.Module]:
        """The module whose output is ``X_L`` (see ``final_norm``), or None when it is the last layer's."""
        if not self.final_norm:
            return None
        return getattr(model, "base_model", model).get_submodule(self.final_norm)
    def layer_modules(self, model: nn.Module) -> list[nn.Module]:
        return list(self.layer_list(model))

    def mha_output_module(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(self.mha_output)

    def attention_output_module(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(self.attention_output)


def register_family(factory: Callable[[], FamilyAdapter]) -> Callable[[], FamilyAdapter]:
    """Decorator: register the adapter the decorated function returns under each of its ``model_types``."""
    adapter = factory()
    for model_type in adapter.model_types:
        if model_type in FAMILIES:
            raise ValueError(f"model_type {model_type!r} is registered twice ({FAMILIES[model_type].family!r} and "
                             f"{adapter.family!r})")
        FAMILIES[model_type] = adapter
    return factory
