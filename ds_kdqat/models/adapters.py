"""Where each encoder architecture keeps the modules that taps and interventions hook into.

Scores, maps and contexts come from the shared attention function (:mod:`ds_kdqat.models.attention`) and
need no per-architecture knowledge. The other taps are module outputs, and their module paths differ by
architecture; an :class:`EncoderAdapter` names them, relative to one transformer layer:

* ``mha_output``: the linear output projection ``Concat(context)·W_O + b_O`` (pre-dropout, pre-residual);
* ``attention_output``: the module whose output is ``Y_l = LayerNorm(X_l + MHA(X_l))``;
* the layer module's own output is ``X_{l+1}``, and the input of the first layer is the embedding output
  ``X_0`` (after any embedding projection, as HF's ``hidden_states[0]``).

``ADAPTERS`` maps HF ``config.model_type`` to its adapter; :func:`register_adapter` fills it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn


@dataclass(frozen=True)
class EncoderAdapter:
    """Module paths of one architecture (dotted, as in ``nn.Module.get_submodule``).

    ``layers``: the ``nn.ModuleList`` of transformer layers, relative to ``model.base_model``;
    ``mha_output`` / ``attention_output``: relative to one layer; ``token_type_ids``: whether the model's
    forward accepts ``token_type_ids`` (DistilBERT does not).
    """

    layers: str
    mha_output: str
    attention_output: str
    token_type_ids: bool = True

    def layer_modules(self, model: nn.Module) -> list[nn.Module]:
        base = getattr(model, "base_model", model)
        return list(base.get_submodule(self.layers))

    def mha_output_module(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(self.mha_output)

    def attention_output_module(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(self.attention_output)


ADAPTERS: dict[str, EncoderAdapter] = {}


def register_adapter(*model_types: str) -> Callable[[Callable[[], EncoderAdapter]], Callable[[], EncoderAdapter]]:
    """Decorator: the decorated function returns the adapter shared by ``model_types``."""

    def decorate(factory: Callable[[], EncoderAdapter]) -> Callable[[], EncoderAdapter]:
        adapter = factory()
        for model_type in model_types:
            ADAPTERS[model_type] = adapter
        return factory

    return decorate


@register_adapter("bert", "roberta", "electra")
def _bert_like() -> EncoderAdapter:
    # layer.attention.output is XxxSelfOutput: dense -> dropout -> LayerNorm(· + input)
    return EncoderAdapter(
        layers="encoder.layer", mha_output="attention.output.dense", attention_output="attention.output"
    )


@register_adapter("distilbert")
def _distilbert() -> EncoderAdapter:
    # TransformerBlock: attention (ends with out_lin) -> sa_layer_norm(· + input) -> ffn -> output_layer_norm
    return EncoderAdapter(
        layers="transformer.layer", mha_output="attention.out_lin", attention_output="sa_layer_norm",
        token_type_ids=False,
    )


def adapter_for(model: nn.Module) -> EncoderAdapter:
    """The adapter for ``model`` by its ``config.model_type``; ValueError names the supported types."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"no encoder adapter for model_type {model_type!r} ({type(model).__name__}); "
            f"supported: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type]
