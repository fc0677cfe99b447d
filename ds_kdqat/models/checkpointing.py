"""Activation checkpointing of an encoder's layers that keeps every tap and teacher intervention right.

:func:`enable_activation_checkpointing` (``kdqat.train.activation_checkpointing`` / ``kdqat.finetune.…``) makes
each encoder layer of a model run under ``torch.utils.checkpoint`` with ``use_reentrant=False``, through HF's own
per-layer mechanism (every registered family's layer is a ``GradientCheckpointingLayer``; the layer's *forward*
is checkpointed, so hooks on the layer module itself run once). In training, a checkpointed layer keeps only its
inputs (hidden states (B, S, D), the shared attention mask, T5's position bias); everything its forward saved for
the backward is dropped and recomputed, layer by layer, when the backward first needs it.

Why torch's non-reentrant checkpoint and not DeepSpeed's ``deepspeed.checkpointing`` (the ds_config's
``activation_checkpointing`` section configures only the latter, which HF encoders never call):

* the taps recorded inside a layer (scores, maps, contexts, MHA and attention outputs) are what the KD losses
  read, so they must stay in the autograd graph. DeepSpeed's ``checkpoint`` (like torch's ``use_reentrant=True``)
  runs the forward under ``no_grad``: a loss on a tap inside a layer would silently train nothing. The
  non-reentrant checkpoint records the whole graph and only replaces the saved tensors;
* it takes a ``context_fn``, through which the recomputation re-enters the forward's tap session (below);
* DeepSpeed's extras (``partition_activations`` across model-parallel ranks, contiguous buffers) need Megatron
  model parallelism, which ds-kdqat does not use; ZeRO 0-3 work with torch's checkpoint: ZeRO-3's module hooks
  gather the parameters again for the modules a recomputation runs (DeepSpeed 0.19.8 also handles frozen
  parameters there).

What a recomputation sees (the layer's forward run again inside the backward) is what its forward saw:

* the same dropout masks: the CPU and device RNG states are stashed and restored (``preserve_rng_state``);
* the same teacher tensors: the tap session that was active when the layer ran
  (:func:`ds_kdqat.models.attention.current_session`) is re-entered through its ``replaying()``: the same
  replacements (attention map, context, MHA output), nothing recorded, so no tap is recorded twice;
* the same quantization: weights and LAT's second moment do not change between a forward and its backward, LSQ's
  step is initialised by the first forward; the memo of a shared activation quantizer (Q/K/V's common input) is
  forgotten when a layer's forward or recomputation starts and ends, so both quantize the same way (else the
  recomputation would find the forward's memo for the very same input tensor, save fewer tensors and fail
  checkpoint's check) and no recomputed tensor outlives its layer's backward;
* backward-side effects happen once: only the forward's graph is backpropagated (the recomputation just refills
  its saved tensors), so each ``.grad`` and LAT's gradient sink (``grad_accum``) are written once.

The teacher is not checkpointed: it runs without gradients (``no_grad`` or ``inference_mode``), keeps nothing
for a backward, and HF's layers do not checkpoint without gradients anyway.

Saved-tensor hooks inside a layer (``torch.autograd.graph.saved_tensors_hooks``) take precedence over the
checkpoint's own (PyTorch applies only the innermost pair): what an op saves under such hooks would be kept by
those hooks, not dropped by checkpointing (gradients stay right, the memory saving shrinks). So inside a
checkpointed layer, forward and recomputation alike, the quantized linears and attention matmuls save their
operands plainly (``ds_kdqat.quant.codes.fp32_saves``) instead of as integer codes: checkpointing drops them.
:func:`in_checkpointed_layer` tells other such code that it runs in a checkpointed layer.
"""

from __future__ import annotations

import contextlib
import contextvars
from functools import partial
from typing import Any, ContextManager, Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import TapSession, active_session, current_session
from .families import adapter_for

__all__ = ["enable_activation_checkpointing", "disable_activation_checkpointing", "layer_checkpointing",
           "checkpointing_replays_sessions", "in_checkpointed_layer"]


class _RecordNothing:
    """The recomputation context for a tap session without ``replaying()``: a view of it with the same
    replacements and no recording is active (it holds the session)."""

    def __init__(self, session: TapSession):
        self.session = session
        self._entered: list[ContextManager] = []

    def record(self, layer: int, name: str, tensor: torch.Tensor) -> None:
        pass

    def replacement(self, layer: int, name: str) -> Optional[torch.Tensor]:
        return self.session.replacement(layer, name)

    def __enter__(self) -> None:
        context = active_session(self)
        context.__enter__()
        self._entered.append(context)

    def __exit__(self, *exc) -> bool:
        return bool(self._entered.pop().__exit__(*exc))


def _replay_of(session: Optional[TapSession]) -> ContextManager:
    """The context a layer's recomputation runs in, taken from the tap session active when the layer runs."""
    if session is None:
        return contextlib.nullcontext()
    replaying = getattr(session, "replaying", None)
    return replaying() if replaying is not None else _RecordNothing(session)


def _forget_memos(quantizers: Sequence[nn.Module]) -> None:
    """Drop what each shared activation quantizer remembers of its last input (see the module docstring)."""
    for quantizer in quantizers:
        forget = getattr(quantizer, "forget_memo", None)
        if forget is not None:
            forget()
        else:
            quantizer.__dict__.pop("_memo", None)


_INSIDE: contextvars.ContextVar[bool] = contextvars.ContextVar("kdqat_checkpointed_layer", default=False)


def in_checkpointed_layer() -> bool:
    """True while a layer checkpointed by :func:`enable_activation_checkpointing` runs, in its forward and in its
    recomputation alike. Code inside a layer that installs its own saved-tensor hooks should not while this is
    true: PyTorch applies only the innermost hooks, so checkpointing would not drop what is saved under them (the
    answer must be the same in the forward and the recomputation, or their saved tensors no longer match)."""
    return _INSIDE.get()


def _plain_saves() -> ContextManager:
    """The quantized ops' own saved-tensor hooks (integer codes, :mod:`ds_kdqat.quant.codes`) switched off: PyTorch
    applies only the innermost hooks, so under them checkpointing would keep what those ops save instead of
    dropping it. A checkpointed layer saves nothing for the backward anyway."""
    try:
        from ds_kdqat.quant.codes import fp32_saves
    except ImportError:  # pragma: no cover - a quantization without codes
        return contextlib.nullcontext()
    return fp32_saves()


class _LayerContext:
    """The context of a checkpointed layer's forward or (``replay`` given) of its recomputation: shared activation
    quantizers forget their memo on entry and exit, :func:`in_checkpointed_layer` is true, the quantized ops save
    plainly, and ``replay`` (the tap session's) is entered. Re-entrant (one recomputation per backward)."""

    def __init__(self, quantizers: Sequence[nn.Module], replay: Optional[ContextManager] = None):
        self.quantizers, self.replay = quantizers, replay
        self._entered: list[contextlib.ExitStack] = []

    def __enter__(self) -> None:
        _forget_memos(self.quantizers)
        stack = contextlib.ExitStack()
        stack.callback(_forget_memos, self.quantizers)
        stack.callback(_INSIDE.reset, _INSIDE.set(True))
        stack.enter_context(_plain_saves())
        if self.replay is not None:
            stack.enter_context(self.replay)
        self._entered.append(stack)

    def __exit__(self, *exc) -> bool:
        return bool(self._entered.pop().__exit__(*exc))


class LayerContexts:
    """``context_fn`` of ``torch.utils.checkpoint``: called when a layer's checkpointed forward starts, it returns
    the contexts of that forward and of its later recomputation; the latter replays the tap session active now.
    """

    def __init__(self, quantizers: Sequence[nn.Module]):
        self.quantizers = tuple(quantizers)

    def __call__(self) -> tuple[ContextManager, ContextManager]:
        return (_LayerContext(self.quantizers),
                _LayerContext(self.quantizers, _replay_of(current_session())))


def _shared_act_quantizers(model: nn.Module) -> list[nn.Module]:
    from ds_kdqat.quant.modules import ActQuantizer  # the quantizers import the model families: import on use

    return [m for m in model.modules() if isinstance(m, ActQuantizer) and m.shared]


def _layers(model: nn.Module) -> list[nn.Module]:
    inner = getattr(model, "module", model)
    return adapter_for(inner).layer_modules(inner)


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Checkpoint every encoder layer of ``model`` (an HF model of a registered family, or a wrapper with
    ``.module``) in training, as the module docstring describes. Call it after quantization (the shared activation
    quantizers are looked up now). Returns the number of layers; ValueError when the family's layers do not support
    HF's checkpointing."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    inner = getattr(model, "module", model)
    layers = _layers(inner)
    unsupported = sorted({type(layer).__name__ for layer in layers
                          if not isinstance(layer, GradientCheckpointingLayer)})
    if not layers or unsupported or not getattr(inner, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(inner).__name__}: its layers ({', '.join(unsupported) or 'none found'}) do not "
                         "support activation checkpointing (HF's GradientCheckpointingLayer)")
    kwargs = {"use_reentrant": False, "preserve_rng_state": True,
              "context_fn": LayerContexts(_shared_act_quantizers(inner))}
    if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # pragma: no cover - older transformers
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    config = getattr(inner, "config", None)
    if getattr(config, "use_cache", None):
        config.use_cache = False  # encoders have no cache; HF warns about it under checkpointing otherwise
    return len(layers)


def disable_activation_checkpointing(model: nn.Module) -> None:
    """Undo :func:`enable_activation_checkpointing`."""
    inner = getattr(model, "module", model)
    if hasattr(inner, "activation_checkpointing_disable"):
        inner.activation_checkpointing_disable()
    else:  # pragma: no cover - older transformers
        inner.gradient_checkpointing_disable()


def layer_checkpointing(model: nn.Module) -> Optional[dict[str, Any]]:
    """None when no encoder layer of ``model`` is checkpointed; else the keyword arguments its layers pass to
    ``torch.utils.checkpoint`` as far as they can be read (``{}`` when not: to be treated as reentrant)."""
    try:
        layers = _layers(model)
    except (KeyError, ValueError, AttributeError):
        return None
    on = [layer for layer in layers if getattr(layer, "gradient_checkpointing", False)]
    if not on:
        return None
    function = getattr(on[0], "_gradient_checkpointing_func", None)
    keywords = getattr(function, "keywords", None)
    if not isinstance(function, partial) or function.func is not checkpoint or not isinstance(keywords, dict):
        return {}
    return dict(keywords)


def checkpointing_replays_sessions(model: nn.Module) -> bool:
    """Whether ``model``'s layers are checkpointed by :func:`enable_activation_checkpointing` (non-reentrant, the
    recomputation re-entering the tap session), which keeps taps and interventions right."""
    kwargs = layer_checkpointing(model)
    return (kwargs is not None and kwargs.get("use_reentrant") is False
            and isinstance(kwargs.get("context_fn"), LayerContexts))
