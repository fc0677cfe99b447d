"""Named quantization placements (``kdqat.quant.preset``).

Presets name module **roles** (``query``, ``key``, ``value``, ``attention_output_projection``, ``ffn_in``,
``ffn_out``, ``word_embedding``, ``pooler``), not module names: :func:`~ds_kdqat.quant.quantize_model` resolves
them through the model's family adapter (:mod:`ds_kdqat.models.families`), so every preset works for every
registered family. Roles a family lacks (ViT's word embedding, DistilBERT's and RoBERTa's pooler) are in
``optional`` groups.

A preset is written in the config's own vocabulary: its ``groups`` are ``kdqat.quant.groups`` entries and its
``attention`` a ``kdqat.quant.attention`` object, as plain dicts (so this module needs nothing from
:mod:`ds_kdqat.quant.config`, which parses them when it resolves a preset).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

ENCODER_LINEARS = ["query", "key", "value", "attention_output_projection", "ffn_in", "ffn_out"]
WORD_EMBEDDING = ["word_embedding"]
POOLER = ["pooler"]


@dataclass
class Preset:
    """``groups``: ``kdqat.quant.groups`` entries; ``attention``: a ``kdqat.quant.attention`` object."""

    groups: list[dict[str, Any]]
    attention: dict[str, Any]


PRESETS: dict[str, Callable[[], Preset]] = {}


def preset(name: str):
    def register(fn: Callable[[], Preset]) -> Callable[[], Preset]:
        PRESETS[name] = fn
        return fn

    return register


def _ternary(method: str) -> Preset:
    return Preset(
        groups=[
            dict(roles=list(ENCODER_LINEARS), method=method, granularity="layer", act_bits=8, act_mode="minmax"),
            dict(roles=list(WORD_EMBEDDING), method=method, granularity="row", act_bits=None, optional=True),
        ],
        attention=dict(bits=8, mode="minmax"),
    )


@preset("ternarybert")
def ternarybert() -> Preset:
    """W2-E2-A8 (TernaryBERT): TWN layer-wise on Q, K, V, O, FFN1, FFN2; TWN row-wise on the word embedding;
    8-bit min-max activations at those linears' inputs and before both attention matmuls."""
    return _ternary("twn")


@preset("ternarybert_lat")
def ternarybert_lat() -> Preset:
    """As ``ternarybert`` with loss-aware ternarization (TernaryBERT_LAT)."""
    return _ternary("lat")


@preset("ternarybert_lsq")
def ternarybert_lsq() -> Preset:
    """As ``ternarybert`` with LSQ activations: 8-bit signed codes with a learned step size (Esser et al.,
    2020) at the linears' inputs and before both attention matmuls, instead of per-batch min-max."""
    lsq = dict(act_method="lsq", act_bits=8, act_mode="symmetric")
    return Preset(
        groups=[
            dict(roles=list(ENCODER_LINEARS), method="twn", granularity="layer", **lsq),
            dict(roles=list(WORD_EMBEDDING), method="twn", granularity="row", act_bits=None, optional=True),
        ],
        attention=dict(method="lsq", bits=8, mode="symmetric"),
    )


@preset("ternarybert_reference")
def ternarybert_reference() -> Preset:
    """What TernaryBERT's released code does: TWN with clip 2.5 on Q, K, V, O, FFN1, FFN2 and the pooler dense
    (layer-wise) and on the word embedding (row-wise); 8-bit symmetric activations clipped to ±2.5 at the input
    of every quantized linear and on Q, K, V and the attention map."""
    linear = dict(method="twn", granularity="layer", clip=2.5, act_bits=8, act_mode="symmetric", act_clip=2.5)
    return Preset(
        groups=[
            dict(roles=list(ENCODER_LINEARS), **linear),
            dict(roles=list(POOLER), optional=True, **linear),
            dict(roles=list(WORD_EMBEDDING), method="twn", granularity="row", clip=2.5, act_bits=None,
                 optional=True),
        ],
        attention=dict(bits=8, mode="symmetric", clip=2.5),
    )


@preset("w8a8")
def w8a8() -> Preset:
    """8-8-8 (TernaryBERT's 8-bit setting): 8-bit symmetric weights with one scale per matrix for the linears
    and for the word embedding (layer-wise, "as 8-bit quantization already has high resolution": TernaryBERT
    §4, set-up), 8-bit min-max activations.

    A row-wise word embedding (one scale per token row, as the ternary presets use) stays available through
    explicit groups, e.g. ``"groups": [{"roles": [<the six encoder linears>], "method": "uniform", "bits": 8},
    {"roles": ["word_embedding"], "method": "uniform", "bits": 8, "granularity": "row", "act_bits": null,
    "optional": true}]`` (explicit groups replace the preset's groups; its attention setting stays)."""
    return Preset(
        groups=[
            dict(roles=list(ENCODER_LINEARS), method="uniform", bits=8, mode="symmetric"),
            dict(roles=list(WORD_EMBEDDING), method="uniform", bits=8, mode="symmetric", granularity="layer",
                 act_bits=None, optional=True),
        ],
        attention=dict(bits=8, mode="minmax"),
    )


@preset("binary")
def binary() -> Preset:
    """W1-E1-A8: binary weights (layer-wise linears, row-wise word embedding), 8-bit min-max activations."""
    return Preset(
        groups=[
            dict(roles=list(ENCODER_LINEARS), method="binary"),
            dict(roles=list(WORD_EMBEDDING), method="binary", granularity="row", act_bits=None, optional=True),
        ],
        attention=dict(bits=8, mode="minmax"),
    )


@preset("vit_w2")
def vit_w2() -> Preset:
    """The TI paper's ViT "2bit" setting: ternary (TWN, layer-wise) Q, K, V, O, FFN1, FFN2 with 8-bit min-max
    activations at their inputs and before both attention matmuls. ViT has no word embedding, and its patch
    embedding (a Conv2d), [CLS]/position embeddings, LayerNorms and classifier stay full precision; a text family
    also gets its word embedding ternarized row-wise (so on BERT this is ``ternarybert``)."""
    return _ternary("twn")


@preset("vit_w4")
def vit_w4() -> Preset:
    """The TI paper's ViT "4bit" setting: 4-bit symmetric uniform weights with one scale per output row (4 bits
    leave too few levels for one scale per matrix) on Q, K, V, O, FFN1, FFN2, 8-bit min-max activations at their
    inputs and before both attention matmuls; a text family's word embedding gets 4 bits row-wise too."""
    return Preset(
        groups=[
            dict(roles=list(ENCODER_LINEARS), method="uniform", bits=4, mode="symmetric", granularity="row",
                 act_bits=8, act_mode="minmax"),
            dict(roles=list(WORD_EMBEDDING), method="uniform", bits=4, mode="symmetric", granularity="row",
                 act_bits=None, optional=True),
        ],
        attention=dict(bits=8, mode="minmax"),
    )


@preset("none")
def none() -> Preset:
    """Full precision: nothing quantized (the attention still runs through the kdqat function)."""
    return Preset(groups=[], attention=dict(points=[], bits=None))
