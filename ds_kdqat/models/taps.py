"""One forward of an encoder (any registered family) that returns its internals (taps) and takes teacher interventions.

The same function serves the full-precision teacher (usually under ``torch.no_grad()``) and the quantized
student (with autograd): the recorded student tensors keep their graph, so losses on them train the
student.

Shapes (B batch, S sequence, H heads, D hidden, D_h = D / H, L layers), per layer ``l``:

=====================  ===================  ====================================================================
tap name               shape                what
=====================  ===================  ====================================================================
``attention_scores``   (B, H, S, S)         ``Q·Kᵀ/√D_h + mask`` (pre-softmax; padded keys hold the additive
                                            mask value, about -3.4e38 in float32)
``attention_maps``     (B, H, S, S)         ``softmax(score)`` (pre-dropout; padded keys are 0)
``contexts``           (B, H, S, D_h)       ``map·V`` per head
``mha_outputs``        (B, S, D)            ``Concat(context)·W_O + b_O`` (pre-dropout, pre-residual)
``attention_outputs``  (B, S, D)            ``Y_l = LayerNorm(X_l + MHA(X_l))``
``layer_outputs``      L+1 × (B, S, D)      ``X_0`` (embedding output) then ``X_{l+1}`` for each layer
``embedding_output``   (B, S, D)            ``X_0``
=====================  ===================  ====================================================================

These are the post-LN (BERT) definitions; a pre-LN family documents its counterparts in its adapter module
(ViT: ``Y_l = X_l + MHA(LN(X_l))``, ``X_{l+1} = Y_l + FFN(LN(Y_l))``, see :mod:`.families.vit`).

``logits`` (the head's output, e.g. (B, C); (B, S, 2) start/end for a QA head; None for a bare encoder) and ``attention_mask`` ((B, S) bool,
True = real token) are always returned. Inputs without padding (``pixel_values``: S = patches + [CLS]) get
an all-True mask of the sequence the layers see.

Interventions (Teacher Intervention): per layer, the student's ``attention_map`` (TI-M), ``context`` or
``mha_output`` (TI-O) is replaced by a given tensor, detached, so no gradient flows back through the
replaced value; everything downstream runs and trains as usual. The tap of an intervened point holds the
student's *own* tensor (computed before the replacement), so a loss can still be put on it.

Activation checkpointing: with :func:`~.checkpointing.enable_activation_checkpointing` the layers' forwards are
recomputed in the backward; the recomputation replays the session (:meth:`_Recorder.replaying`: the same
interventions, nothing recorded; the recorded taps are not kept for it), so taps and gradients are those of the run without checkpointing. Checkpointing
set up otherwise is refused where it would be wrong (reentrant with taps inside the layers; interventions).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Iterable, Mapping, Optional

import torch
from torch import nn

from .families import FamilyAdapter, adapter_for
from .attention import KDQAT_ATTENTION, active_session, self_attention_modules, use_kdqat_attention

PER_LAYER_TAPS = ("attention_scores", "attention_maps", "contexts", "mha_outputs", "attention_outputs")
TAP_NAMES = frozenset({"embedding_output", "layer_outputs", *PER_LAYER_TAPS})
# names the attention function reports (singular) -> EncoderTaps field
_ATTENTION_FUNCTION_TAPS = {
    "attention_score": "attention_scores",
    "attention_map": "attention_maps",
    "context": "contexts",
}


# input kind (FamilyAdapter.input_kind) -> (adapter, batch) -> (model kwargs, attention mask (B, S) or None when
# the inputs have no padding: every position of the sequence the layers see is real)
InputBuilder = Callable[[FamilyAdapter, Mapping[str, torch.Tensor]],
                        tuple[dict[str, torch.Tensor], Optional[torch.Tensor]]]
MODEL_INPUTS: dict[str, InputBuilder] = {}


def model_input(kind: str) -> Callable[[InputBuilder], InputBuilder]:
    """Decorator: register the decorated function as the input builder of input kind ``kind``."""

    def register(fn: InputBuilder) -> InputBuilder:
        MODEL_INPUTS[kind] = fn
        return fn

    return register


@model_input("tokens")
def token_inputs(adapter: FamilyAdapter, batch: Mapping[str, torch.Tensor]):
    """``input_ids`` (B, S), ``attention_mask`` (B, S) (all ones when absent) and, for families that take them,
    ``token_type_ids`` (B, S)."""
    if "input_ids" not in batch:
        raise ValueError(f"batch needs 'input_ids'; got keys {sorted(batch)}")
    input_ids = batch["input_ids"]
    attention_mask = batch.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if adapter.token_type_ids and batch.get("token_type_ids") is not None:
        inputs["token_type_ids"] = batch["token_type_ids"]
    return inputs, attention_mask


@model_input("pixels")
def pixel_inputs(adapter: FamilyAdapter, batch: Mapping[str, torch.Tensor]):
    """``pixel_values`` (B, C, H, W) at the model's image size; no mask (no image token is padding)."""
    if "pixel_values" not in batch:
        raise ValueError(f"batch needs 'pixel_values' (the {adapter.family} family takes images); "
                         f"got keys {sorted(batch)}")
    return {"pixel_values": batch["pixel_values"]}, None


@dataclass
class EncoderTaps:
    """The internals of one encoder forward. Lists are indexed by layer; an entry is None when not recorded.

    ``layer_outputs`` has L+1 entries (embedding output first) when recorded, else it is empty, as are the
    per-layer lists that were not asked for.
    """

    embedding_output: Optional[torch.Tensor] = None
    attention_scores: list[Optional[torch.Tensor]] = field(default_factory=list)
    attention_maps: list[Optional[torch.Tensor]] = field(default_factory=list)
    contexts: list[Optional[torch.Tensor]] = field(default_factory=list)
    mha_outputs: list[Optional[torch.Tensor]] = field(default_factory=list)
    attention_outputs: list[Optional[torch.Tensor]] = field(default_factory=list)
    layer_outputs: list[Optional[torch.Tensor]] = field(default_factory=list)
    logits: Optional[torch.Tensor] = None
    attention_mask: Optional[torch.Tensor] = None

    def get(self, name: str, layer: int) -> torch.Tensor:
        """Tensor ``name`` of layer ``layer``; KeyError says what was not recorded."""
        values = getattr(self, name)
        tensor = values[layer] if 0 <= layer < len(values) else None
        if tensor is None:
            raise KeyError(f"tap {name}[{layer}] was not recorded (recorded lists have {len(values)} entries)")
        return tensor


@dataclass
class Interventions:
    """Teacher tensors that replace the student's, keyed by layer index.

    ``attention_maps``: (B, H, S, S) (TI-M); ``contexts``: (B, H, S, D_h); ``mha_outputs``: (B, S, D) (TI-O).
    Each must have exactly the shape of the tensor it replaces.
    """

    attention_maps: dict[int, torch.Tensor] = field(default_factory=dict)
    contexts: dict[int, torch.Tensor] = field(default_factory=dict)
    mha_outputs: dict[int, torch.Tensor] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.attention_maps or self.contexts or self.mha_outputs)


class _Recorder:
    """TapSession for the attention function plus the storage the module hooks write into.

    ``adapter``/``layer_modules``: the model's, for :meth:`replaying` (activation checkpointing)."""

    def __init__(self, record: frozenset[str], layers: Optional[frozenset[int]], num_layers: int,
                 interventions: Optional[Interventions], adapter: Optional[FamilyAdapter] = None,
                 layer_modules: Optional[list[nn.Module]] = None):
        self.record_names = record
        self.layers = layers
        self.num_layers = num_layers
        self.interventions = interventions or Interventions()
        self.adapter = adapter
        self.layer_modules = layer_modules or []
        self.taps = EncoderTaps()
        for name in PER_LAYER_TAPS:
            if name in record:
                setattr(self.taps, name, [None] * num_layers)
        if "layer_outputs" in record:
            self.taps.layer_outputs = [None] * (num_layers + 1)
        self._last_shape: dict[tuple[int, str], torch.Size] = {}

    def wants(self, name: str, layer: int) -> bool:
        return name in self.record_names and (self.layers is None or layer in self.layers)

    def store(self, name: str, layer: int, tensor: torch.Tensor) -> None:
        if self.wants(name, layer):
            getattr(self.taps, name)[layer] = tensor

    # --- TapSession protocol (called by the attention function) ---
    def record(self, layer: int, name: str, tensor: torch.Tensor) -> None:
        self._last_shape[(layer, name)] = tensor.shape
        self.store(_ATTENTION_FUNCTION_TAPS[name], layer, tensor)

    def replacement(self, layer: int, name: str) -> Optional[torch.Tensor]:
        source = getattr(self.interventions, _ATTENTION_FUNCTION_TAPS[name], {})
        tensor = source.get(layer)
        if tensor is not None:
            _check_shape(tensor, self._last_shape[(layer, name)], layer, name)
        return tensor

    def replaying(self) -> "_Replay":
        """The context of a later recomputation of part of this forward (activation checkpointing,
        :mod:`ds_kdqat.models.checkpointing`): the same interventions, nothing recorded. It holds the interventions
        and where to hook them, not the recorded taps."""
        return _Replay(self.num_layers, self.interventions, self.adapter, self.layer_modules)


class _Replay:
    """While entered: a session with ``interventions`` and no recording is active, and the MHA-output hooks of
    ``interventions`` are installed (re-entrant: a recomputation may run once per backward)."""

    def __init__(self, num_layers: int, interventions: Interventions, adapter: Optional[FamilyAdapter],
                 layer_modules: list[nn.Module]):
        self.num_layers, self.interventions = num_layers, interventions
        self.adapter, self.layer_modules = adapter, layer_modules
        self._entered: list[contextlib.ExitStack] = []

    def __enter__(self) -> None:
        replay = _Recorder(frozenset(), None, self.num_layers, self.interventions, self.adapter, self.layer_modules)
        stack = contextlib.ExitStack()
        if self.adapter is not None:
            for handle in _install_hooks(replay, self.adapter, self.layer_modules, None):
                stack.callback(handle.remove)
        stack.enter_context(active_session(replay))
        self._entered.append(stack)

    def __exit__(self, *exc) -> bool:
        return bool(self._entered.pop().__exit__(*exc))


def _check_shape(replacement: torch.Tensor, expected: torch.Size, layer: int, name: str) -> None:
    if replacement.shape != expected:
        raise ValueError(
            f"intervention {name}[{layer}] has shape {tuple(replacement.shape)}; the student's tensor has "
            f"shape {tuple(expected)}"
        )


def _first_tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _install_hooks(recorder: _Recorder, adapter: FamilyAdapter, layers: list[nn.Module],
                   sequence: Optional[list], final_norm: Optional[nn.Module] = None) -> list[Any]:
    """Hooks that fill ``recorder``; ``sequence`` (when given) receives the (B, S) of layer 0's input;
    ``final_norm`` (when given) is the module whose output is the last layer output ``X_L``."""
    handles = []
    want_embedding = bool({"embedding_output", "layer_outputs"} & recorder.record_names)

    if want_embedding or sequence is not None:
        def embedding_hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if sequence is not None:
                sequence[:] = [hidden.shape[:2], hidden.device]
            if "embedding_output" in recorder.record_names:
                recorder.taps.embedding_output = hidden
            if "layer_outputs" in recorder.record_names:
                recorder.taps.layer_outputs[0] = hidden

        handles.append(layers[0].register_forward_pre_hook(embedding_hook, with_kwargs=True))

    for index, layer in enumerate(layers):
        if recorder.wants("layer_outputs", index):
            def layer_hook(module, args, output, index=index):
                recorder.taps.layer_outputs[index + 1] = _first_tensor(output)

            last_output = final_norm if index == len(layers) - 1 else None  # pre-LN X_L after the final norm
            handles.append((layer if last_output is None else last_output).register_forward_hook(layer_hook))

        teacher_mha = recorder.interventions.mha_outputs.get(index)
        if recorder.wants("mha_outputs", index) or teacher_mha is not None:
            def mha_hook(module, args, output, index=index, teacher=teacher_mha):
                recorder.store("mha_outputs", index, output)
                if teacher is None:
                    return None
                _check_shape(teacher, output.shape, index, "mha_output")
                return teacher.detach().to(output.dtype)

            handles.append(adapter.mha_output_module(layer).register_forward_hook(mha_hook))

        if recorder.wants("attention_outputs", index):
            module = adapter.attention_output_module(layer)
            if adapter.attention_output_at == "input":  # pre-LN: Y_l is what the second LayerNorm takes
                def attention_input_hook(module, args, kwargs, index=index):
                    recorder.store("attention_outputs", index, args[0] if args else next(iter(kwargs.values())))

                handles.append(module.register_forward_pre_hook(attention_input_hook, with_kwargs=True))
            else:
                def attention_output_hook(module, args, output, index=index):
                    recorder.store("attention_outputs", index, _first_tensor(output))

                handles.append(module.register_forward_hook(attention_output_hook))
    return handles


def _ensure_kdqat_attention(model: nn.Module, num_layers: int) -> None:
    """Route through the kdqat attention and number the layers unless that is already done."""
    routed = getattr(model.config, "_attn_implementation", None) == KDQAT_ATTENTION
    numbered = [getattr(m, "kdqat_layer_index", None) for m in self_attention_modules(model)]
    if not routed or numbered != list(range(num_layers)):
        use_kdqat_attention(model)


def _check_checkpointing(model: nn.Module, record: frozenset[str], interventions: Interventions) -> None:
    """Activation checkpointing set up other than by :func:`~.checkpointing.enable_activation_checkpointing`:
    reentrant (the layers run without autograd: taps inside them would get no gradient) or without re-entering
    the tap session (the recomputation would not see the teacher's tensors) is refused where it would be wrong."""
    from .checkpointing import checkpointing_replays_sessions, layer_checkpointing

    kwargs = layer_checkpointing(model)
    if kwargs is None or checkpointing_replays_sessions(model):
        return
    how = "use ds_kdqat.models.checkpointing.enable_activation_checkpointing (kdqat.train.activation_checkpointing)"
    if kwargs.get("use_reentrant") is not False and record & set(PER_LAYER_TAPS):
        raise ValueError("reentrant activation (gradient) checkpointing runs the layers without autograd, so taps "
                         f"recorded inside them would get no gradient; {how}")
    if interventions:
        raise ValueError("interventions cannot be combined with this gradient checkpointing (its recomputed forward "
                         f"would not see the teacher's tensors); {how}")


def _check_interventions(interventions: Interventions, num_layers: int) -> None:
    for name in ("attention_maps", "contexts", "mha_outputs"):
        for layer in getattr(interventions, name):
            if not 0 <= layer < num_layers:
                raise ValueError(f"intervention {name}[{layer}]: the model has layers 0..{num_layers - 1}")


def output_logits(output: Any) -> Optional[torch.Tensor]:
    """The head's ``logits``; for an extractive-QA head (``start_logits``/``end_logits``, each (B, S)) the two
    stacked as (B, S, 2) (``[..., 0]`` start, ``[..., 1]`` end); None for a bare encoder."""
    logits = getattr(output, "logits", None)
    start = getattr(output, "start_logits", None)
    if logits is None and start is not None:
        return torch.stack([start, output.end_logits], dim=-1)
    return logits


def forward_with_taps(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    record: Collection[str] = frozenset(),
    interventions: Optional[Interventions] = None,
    layers: Optional[Iterable[int]] = None,
) -> EncoderTaps:
    """Run ``model`` on ``batch`` once and return the taps named in ``record`` (a subset of ``TAP_NAMES``).

    ``batch``: what the family's input kind takes (:data:`MODEL_INPUTS`); for ``"tokens"``: ``input_ids``
    (B, S), optional ``attention_mask`` (B, S) (1 = token, 0 = padding; all ones when absent) and
    ``token_type_ids`` (passed only to families that take them); for ``"pixels"``: ``pixel_values``
    (B, C, H, W); other keys (labels, …) are not passed.
    ``layers``: record per-layer taps of these layer indices only (None = all); ``layer_outputs[l + 1]``
    follows layer ``l``, and the embedding output is recorded whenever ``layer_outputs`` is.
    ``interventions``: teacher tensors that replace the student's (see :class:`Interventions`).

    The model is routed through the ``kdqat`` attention function on first use (numerically identical to
    HF's eager attention). Only what is asked for is kept, so the memory cost is that of the named taps.
    """
    record = frozenset(record)
    unknown = record - TAP_NAMES
    if unknown:
        raise ValueError(f"unknown tap names {sorted(unknown)}; known: {sorted(TAP_NAMES)}")
    # A wrapper (DeepSpeed's engine, DDP) is called as is, so its forward logic runs; the HF model
    # inside it is what adapters and hooks look at.
    inner = getattr(model, "module", model)
    adapter = adapter_for(inner)
    build_inputs = MODEL_INPUTS.get(adapter.input_kind)
    if build_inputs is None:
        raise ValueError(f"the {adapter.family} family's input kind {adapter.input_kind!r} is not supported by taps "
                         f"yet ({adapter.note or 'no input builder'}); supported: {', '.join(sorted(MODEL_INPUTS))}")
    inputs, attention_mask = build_inputs(adapter, batch)
    layer_modules = adapter.layer_modules(inner)
    num_layers = len(layer_modules)
    _ensure_kdqat_attention(inner, num_layers)
    interventions = interventions or Interventions()
    _check_interventions(interventions, num_layers)
    if inner.training and torch.is_grad_enabled():
        _check_checkpointing(inner, record, interventions)
    layer_set = None if layers is None else frozenset(int(i) for i in layers)

    recorder = _Recorder(record, layer_set, num_layers, interventions, adapter, layer_modules)
    sequence = [] if attention_mask is None else None  # no padding: the mask is all True over layer 0's input
    handles = _install_hooks(recorder, adapter, layer_modules, sequence, adapter.final_norm_module(inner))
    try:
        with active_session(recorder):
            output = model(**inputs)
    finally:
        for handle in handles:
            handle.remove()

    taps = recorder.taps
    taps.logits = output_logits(output)
    if attention_mask is None:
        shape, device = sequence
        attention_mask = torch.ones(shape, dtype=torch.bool, device=device)
    taps.attention_mask = attention_mask.bool()
    return taps
