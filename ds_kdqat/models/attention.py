"""The one attention function every supported encoder runs through.

transformers 5.x lets a model choose its attention kernel by name (``config._attn_implementation``). We
register ``"kdqat"``: an eager attention that is numerically the same as HF's ``eager`` path and has three
extra seams, all keyed on the calling self-attention module so that quantization, taps and teacher
intervention live in one place for BERT, RoBERTa, ELECTRA, ViT and anything else using the interface:

1. activation quantization (set by :mod:`ds_kdqat.quant`): ``module.kdqat_act_quant`` is an optional
   ``nn.ModuleDict`` with any of the keys ``query``, ``key``, ``value``, ``map``; each maps a tensor to its
   fake-quantized copy and is applied right before the matmul that consumes it
   (``query``/``key`` before Q·Kᵀ, ``map``/``value`` before map·V); one that also has ``with_codes`` (an
   :class:`~ds_kdqat.quant.modules.ActQuantizer`) gives the integer codes too, and the matmul's backward
   keeps those codes instead of the float tensor (:mod:`ds_kdqat.quant.codes`);
2. taps: while a :class:`TapSession` is active (see :func:`active_session`), the function reports
   ``attention_score`` (scaled, plus any ``position_bias``, masked, pre-softmax), ``attention_map`` (softmax,
   pre-dropout) and ``context`` (map·V per head), each of shape ``(batch, heads, query, key|head_dim)``;
3. intervention: the same session may hand back a teacher tensor for ``attention_map`` or ``context``;
   it replaces the student's tensor *detached*, so no gradient flows back through the replaced value, and
   everything after it (dropout, map·V, the output projection) runs as usual. A replaced map is used as
   given: the student's own map quantizer is not applied to the teacher's tensor (the teacher's tensor is
   what the intervention wants the student to see), so TI-M gives ``context = teacher_map · quant(V)``.

The layer a module belongs to is ``module.kdqat_layer_index`` (set by :func:`use_kdqat_attention`).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import TYPE_CHECKING, Iterator, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .families import attention_class_names

if TYPE_CHECKING:
    from ds_kdqat.quant.codes import Codes

KDQAT_ATTENTION = "kdqat"



class TapSession(Protocol):
    """What the attention function talks to while taps or interventions are active.

    A session may also have ``replaying()``, called when a checkpointed layer runs (activation checkpointing,
    :mod:`ds_kdqat.models.checkpointing`): it returns the context manager the layer's recomputation runs in later,
    with the same replacements and no recording, holding what the replacements need and not the recorded tensors.
    A session without it is replayed by a view of it that records nothing."""

    def record(self, layer: int, name: str, tensor: torch.Tensor) -> None:
        """Receive tensor ``name`` of layer ``layer``."""

    def replacement(self, layer: int, name: str) -> Optional[torch.Tensor]:
        """Return the tensor that replaces ``name`` of layer ``layer``, or None to keep the student's."""


_ACTIVE: contextvars.ContextVar[Optional[TapSession]] = contextvars.ContextVar("kdqat_tap_session", default=None)


@contextlib.contextmanager
def active_session(session: TapSession) -> Iterator[TapSession]:
    """Make ``session`` receive taps and give interventions for forwards run inside the block."""
    token = _ACTIVE.set(session)
    try:
        yield session
    finally:
        _ACTIVE.reset(token)


def current_session() -> Optional[TapSession]:
    return _ACTIVE.get()


def _maybe_quantize(module: nn.Module, name: str, tensor: torch.Tensor,
                    layout: str) -> tuple[torch.Tensor, Optional["Codes"]]:
    """The module's ``name`` quantizer applied to ``tensor`` (or ``tensor`` itself), and the codes autograd may
    save in its place (None without quantizer, or when no graph is recorded)."""
    quantizers = getattr(module, "kdqat_act_quant", None)
    if quantizers is None or name not in quantizers:
        return tensor, None
    quantizer = quantizers[name]
    if not (torch.is_grad_enabled() and tensor.requires_grad and hasattr(quantizer, "with_codes")):
        return quantizer(tensor), None
    return quantizer.with_codes(tensor, layout)


def kdqat_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    position_bias: Optional[torch.Tensor] = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with quantization, tap and intervention seams.

    Shapes: ``query`` (B, H, Sq, D), ``key``/``value`` (B, H, Sk, D), ``attention_mask`` additive,
    broadcastable to (B, 1, Sq, Sk) or None; ``position_bias``: an additive bias broadcastable to (B, H, Sq, Sk)
    that T5-style models pass (their relative position bias, with ``scaling=1.0``), or None. Returns
    ``(context.transpose(1, 2), attention_map)``, i.e. (B, Sq, H, D) and (B, H, Sq, Sk), as HF's eager function does.

    score = (q̂ · k̂ᵀ)·scaling + position_bias + mask;  map = softmax(score);  context = dropout(m̂ap) · v̂
    """
    from ds_kdqat.quant.codes import dropout_with_codes, saved_as_codes  # the quant package imports this module

    if scaling is None:
        scaling = query.size(-1) ** -0.5
    session = _ACTIVE.get()
    layer = getattr(module, "kdqat_layer_index", -1)

    # q̂ contiguous and k̂ stored as k̂ᵀ: the layouts the batched matmul works on, so that it saves views of them,
    # which autograd keeps as their 8-bit codes
    query, query_codes = _maybe_quantize(module, "query", query, "contiguous")
    key, key_codes = _maybe_quantize(module, "key", key, "transposed")
    with saved_as_codes((query, query_codes), (key, key_codes)):
        scores = torch.matmul(query, key.transpose(2, 3))
    scores = scores * scaling
    if position_bias is not None:  # added before the mask, in HF's T5 eager order
        scores = scores + position_bias
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    attention_map = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if session is not None:
        session.record(layer, "attention_score", scores)
        session.record(layer, "attention_map", attention_map)
        teacher_map = session.replacement(layer, "attention_map")
    else:
        teacher_map = None

    if teacher_map is not None:
        mixing_map, map_codes = teacher_map.detach().to(attention_map.dtype), None
    else:
        mixing_map, map_codes = _maybe_quantize(module, "map", attention_map, "contiguous")
    if map_codes is not None and module.training and dropout > 0:  # the dropped map saved as codes × mask
        mixing_map, map_codes = dropout_with_codes(mixing_map, map_codes, dropout)
    else:
        mixing_map = F.dropout(mixing_map, p=dropout, training=module.training)
    value, value_codes = _maybe_quantize(module, "value", value, "contiguous")
    with saved_as_codes((mixing_map, map_codes), (value, value_codes)):
        context = torch.matmul(mixing_map, value)

    if session is not None:
        session.record(layer, "context", context)
        teacher_context = session.replacement(layer, "context")
        if teacher_context is not None:
            context = teacher_context.detach().to(context.dtype)
    return context.transpose(1, 2).contiguous(), attention_map


def _register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    AttentionInterface.register(KDQAT_ATTENTION, kdqat_attention_forward)
    # Our function adds the mask to the scores, so it needs HF's additive float mask (0 / dtype-min).
    AttentionMaskInterface.register(KDQAT_ATTENTION, eager_mask)


_register()


def self_attention_modules(model: nn.Module) -> list[nn.Module]:
    """The model's self-attention modules in forward (layer) order: those whose class is one of the registered
    families' ``attention_classes`` (:func:`ds_kdqat.models.families.attention_class_names`)."""
    names = attention_class_names()
    return [m for m in model.modules() if type(m).__name__ in names]


def use_kdqat_attention(model: nn.Module) -> int:
    """Route ``model``'s attention through :func:`kdqat_attention_forward` and number its layers.

    Returns the number of self-attention modules found; raises ValueError when there are none (the model
    does not use the attention interface this project hooks into).
    """
    modules = self_attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no self-attention module using HF's attention interface")
    for index, module in enumerate(modules):
        module.kdqat_layer_index = index
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(KDQAT_ATTENTION)
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = KDQAT_ATTENTION
    for sub in model.modules():  # sub-configs (e.g. the encoder's) must agree
        config = getattr(sub, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = KDQAT_ATTENTION
    return len(modules)
