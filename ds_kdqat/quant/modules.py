"""Quantized modules: thin shells around the functional quantizers.

:class:`QuantLinear` and :class:`QuantEmbedding` ARE the HF model's own ``nn.Linear``/``nn.Embedding`` objects
with their class switched (:meth:`QuantLinear.convert`), so parameter names (``…query.weight``), Parameter
objects, hooks and any DeepSpeed ZeRO-3 attributes stay exactly as they were; the latent fp32 weight is what
the optimizer updates and the forward uses its fake-quantized copy (straight-through gradient).

Loss-aware ternarization (LAT) weights the quantization error by ``D = sqrt(v) + eps``, ``v`` a second moment of
the gradient (``kdqat.quant.lat.second_moment``, :class:`~ds_kdqat.quant.config.LatConfig`). Each LAT
:class:`WeightQuantizer` holds the ``v`` its forward uses, ``second_moment``, filled after every applied optimizer
step by :func:`ds_kdqat.quant.after_optimizer_step` (the training loop's :class:`~ds_kdqat.training.callbacks.LatFold`):

* ``"optimizer"`` (default, TernaryBERT's choice): ``v`` IS the optimizer's second moment, Adam's
  ``exp_avg_sq`` for this parameter, as stored (no bias correction): at ZeRO stage 0 the optimizer's state
  tensor itself (of the fp32 master copy with fp16/bf16; no copy is made), under ZeRO 1-3 its partitioned fp32
  state gathered into one full-shaped float32 tensor per rank (a collective; see :mod:`ds_kdqat.quant.lat`).
  Nothing is collected in the backward, and an embedding quantizes only its looked-up rows (D's rows are looked
  up too). Which source is used is decided at the first step: until then (and for an optimizer without such a
  state, which falls back) the quantizer collects gradients as below;
* ``"own"``: backward adds the gradient reaching the latent weight (the straight-through gradient, i.e. exactly
  the parameter's gradient from this use, full-shaped even under ZeRO-3) into ``grad_accum`` (float32) over all
  micro-batches of a step; after the step it is averaged over data-parallel ranks and folded in:
  ``v ← β2·v + (1−β2)·g²``, ``v₀ = 0``: the recursion of Adam's ``exp_avg_sq`` (without bias correction, as
  BertAdam's) fed with the same gradient. It differs from the optimizer's own state where the optimizer sees a
  different gradient: gradient clipping (``v`` here is from the unclipped gradient) and fp16 dynamic loss
  scaling (the gradient here is still scaled; LAT's α and b do not change when ``v`` is scaled by a constant,
  apart from ``eps``, but a loss scale that changes over training mixes scales inside the average).

Steps skipped on overflow must not call :func:`after_optimizer_step`. ``v`` and ``grad_accum`` are plain
attributes, not buffers: they are not in the HF state dict (keys stay HF's), not partitioned by ZeRO-3 (one
full-size float32 copy per rank for each LAT weight, except the stage-0 reference), and not cast by
``model.half()``; :func:`ds_kdqat.quant.lat_state` saves ``v`` for checkpoints and saved students.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ds_kdqat.quant.codes import Codes, saved_as_codes
from ds_kdqat.quant.config import GroupConfig, LatConfig
from ds_kdqat.quant.functional import QuantParts, straight_through
from ds_kdqat.quant.integer import integer_linear
from ds_kdqat.training.zero import is_partitioned
from ds_kdqat.quant.methods import QUANT_METHODS, QuantMethod, activation_methods, weight_methods


class WeightQuantizer(nn.Module):
    """Maps a latent weight to its fake-quantized copy (same shape) with a straight-through gradient.

    The arithmetic is the registered method's (:data:`ds_kdqat.quant.methods.QUANT_METHODS`, ``self.quantizer``);
    this module holds the per-weight state: LAT's second moment and gradient accumulator, the version, ``frozen``.
    """

    def __init__(
        self,
        method: str = "twn",
        bits: int = 2,
        granularity: str = "layer",
        clip: Optional[float] = None,
        mode: str = "symmetric",
        lat: Optional[LatConfig] = None,
    ):
        super().__init__()
        if method not in weight_methods():
            raise ValueError(f"method must be one of {sorted(weight_methods())}, got {method!r}")
        self.quantizer: QuantMethod = QUANT_METHODS[method](bits, granularity, clip, mode)
        self.lat = lat or LatConfig()
        self.second_moment: Optional[torch.Tensor] = None  # LAT: v, the second moment D is built from
        self.grad_accum: Optional[torch.Tensor] = None  # LAT "own": gradient summed since the last fold (float32)
        # LAT: where v comes from, "optimizer" or "own"; None until the first step decides ("own" when configured)
        self.moment_source: Optional[str] = "own" if self.lat.second_moment == "own" else None
        self.lat_folds = 0  # updates of v (folds of the own estimate, or reads of the optimizer's)
        self.version = 0  # bumped whenever the quantized value can change without the weight changing
        # True when the latent weight already holds quantized values (a loaded packed export): the forward then
        # uses it as is, because re-quantizing is only idempotent up to rounding and a one-ulp change can flip
        # an 8-bit activation code downstream
        self.frozen = False

    @classmethod
    def from_group(cls, group: GroupConfig, lat: LatConfig) -> "WeightQuantizer":
        return cls(group.method, group.weight_bits, group.granularity, group.clip, group.mode, lat)

    method = property(lambda self: self.quantizer.name, doc="The registered method's name.")
    bits = property(lambda self: self.quantizer.bits)
    granularity = property(lambda self: self.quantizer.granularity)
    clip = property(lambda self: self.quantizer.clip)
    mode = property(lambda self: self.quantizer.mode)

    @property
    def kind(self) -> str:
        """Stored code kind: ternary, binary, symmetric or minmax."""
        return self.quantizer.kind

    @property
    def collects_gradient(self) -> bool:
        """LAT whose ``v`` is (or may become) its own estimate: the backward adds into ``grad_accum``."""
        return self.method == "lat" and self.moment_source != "optimizer"

    @property
    def quantizes_rows(self) -> bool:
        """Whether :meth:`forward` may be given rows of a table (``rows=``) instead of the table, for row-wise
        granularity: rows quantized independently by the method, or LAT reading the optimizer's second moment
        (D's rows are looked up; with its own estimate it needs the whole table's gradient)."""
        if self.granularity != "row" or self.frozen:
            return False
        return self.quantizer.rows_independent or (self.method == "lat" and not self.collects_gradient)

    def parts(self, w: torch.Tensor) -> QuantParts:
        return self.quantizer.parts(w, self)

    def with_codes(self, w: torch.Tensor) -> tuple[torch.Tensor, Optional[Codes]]:
        """:meth:`forward`'s tensor and its integer codes (None when frozen: ``w`` is used as it is)."""
        if self.frozen:
            return w, None
        return self.quantizer.quantize_with_codes(w, self)

    def reattach(self, w: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor:
        """``w_hat`` (a fake-quantized value of ``w`` computed earlier, without autograd) with :meth:`forward`'s
        straight-through gradient to ``w``."""
        return straight_through(w, w_hat, self.clip, self.quantizer.gradient_sink(w, self))

    def forward(self, w: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The fake-quantized ``w``. ``rows`` (1-D, one index per row of ``w``; only when
        :attr:`quantizes_rows`): ``w`` holds those rows of the weight this quantizer belongs to (an embedding's
        looked-up rows), so per-element state (LAT's ``v``) is read at those rows."""
        if self.frozen:
            return w
        if rows is not None and self.method == "lat":
            return self.quantizer.quantize_rows(w, self, rows)
        return self.quantizer.quantize(w, self)

    @torch.no_grad()
    def use_optimizer_moment(self, v: torch.Tensor) -> None:
        """Take ``v`` (full-shaped, the optimizer's second moment for this weight) as the second moment: from now
        on the source is the optimizer, and no gradient is collected."""
        self.second_moment = v
        self.moment_source = "optimizer"
        self.grad_accum = None
        self.lat_folds += 1
        self.version += 1

    def _accumulator(self, w: torch.Tensor) -> torch.Tensor:
        acc = self.grad_accum
        if acc is None or acc.shape != w.shape or acc.device != w.device:
            acc = self.grad_accum = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        return acc

    @torch.no_grad()
    def fold_gradient(self, grad: torch.Tensor) -> None:
        """``v ← β2·v + (1−β2)·g²`` (``v`` starts at 0, as Adam's)."""
        beta2 = self.lat.beta2
        grad = grad.float()
        if self.second_moment is None or self.second_moment.shape != grad.shape:
            self.second_moment = (1 - beta2) * grad * grad
        else:
            self.second_moment = self.second_moment.to(grad.device)
            self.second_moment.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        self.lat_folds += 1
        self.version += 1

    def describe(self) -> str:
        text = self.quantizer.describe()
        text += f" clip={self.clip:g}" if self.clip is not None else ""
        return text + (" (frozen)" if self.frozen else "")

    def extra_repr(self) -> str:
        return self.describe()


def version_key(x: torch.Tensor) -> Optional[int]:
    """``x``'s version counter, which changes with every in-place update; None for an inference-mode tensor
    (which has none: within ``torch.inference_mode`` a memo keyed on it trusts that an input is not modified in
    place between the linears that share it, as HF's attention modules do not)."""
    return None if x.is_inference() else x._version


class InputMemo:
    """One remembered ``input → result`` pair, kept only while the input tensor lives.

    Q, K and V read one tensor; their shared quantizer gives the same result three times. The result is held
    strongly (between the three calls nothing else may hold it), so the entry is dropped as soon as the input
    is freed (a weak reference's callback): a memo that outlived its input kept one activation per quantizer
    alive between steps. ``key`` adds what else the result depends on (the input's version, grad mode, …).
    """

    def __init__(self):
        self._entry: Optional[tuple] = None

    def get(self, x: torch.Tensor, key):
        entry = self._entry
        if entry is not None and entry[0]() is x and entry[1] == key:
            return entry[2]
        return None

    def put(self, x: torch.Tensor, key, value) -> None:
        self_ref = weakref.ref(self)

        def forget(ref, self_ref=self_ref):
            memo = self_ref()
            if memo is not None and memo._entry is not None and memo._entry[0] is ref:
                memo._entry = None

        self._entry = (weakref.ref(x, forget), key, value)

    def clear(self) -> None:
        self._entry = None

    def __getstate__(self):
        return {"_entry": None}  # a weak reference and a stale activation: neither is kept


class ActQuantizer(nn.Module):
    """Activation fake quantization by a registered activation method (``method``, default ``"uniform"``:
    dynamic per-tensor statistics of the current batch; ``"lsq"``: a learned step size, whose tensors the
    method registers on this module, so they are in its state dict).

    ``shared=True`` when one instance serves several linears fed the same tensor (Q, K and V): it then
    remembers its last input (weakly) and output and returns that output again for the same, unmodified input
    tensor, so the shared input is quantized once per forward.
    """

    def __init__(self, bits: int = 8, mode: str = "minmax", clip: Optional[float] = None, shared: bool = False,
                 method: str = "uniform"):
        super().__init__()
        if method not in activation_methods():
            raise ValueError(f"method must be one of {sorted(activation_methods())}, got {method!r}")
        self.quantizer: QuantMethod = QUANT_METHODS[method](bits, "layer", clip, mode)
        self.quantizer.attach(self)
        self.shared = shared

    method = property(lambda self: self.quantizer.name, doc="The registered method's name.")
    bits = property(lambda self: self.quantizer.bits)
    mode = property(lambda self: self.quantizer.mode)
    clip = property(lambda self: self.quantizer.clip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._quantize(x, codes=False, layout=None)[0]

    def with_codes(self, x: torch.Tensor, layout: Optional[str] = None) -> tuple[torch.Tensor, Optional[Codes]]:
        """:meth:`forward`'s tensor (in memory layout ``layout``, see
        :func:`~ds_kdqat.quant.functional.uniform_with_codes`) and its integer codes, for a consumer that has
        autograd save the codes (:func:`~ds_kdqat.quant.codes.saved_as_codes`)."""
        return self._quantize(x, codes=True, layout=layout)

    def _quantize(self, x: torch.Tensor, codes: bool, layout: Optional[str]) -> tuple[torch.Tensor, Optional[Codes]]:
        key = (version_key(x), torch.is_grad_enabled(), layout)
        if self.shared:
            found = self.memo.get(x, key)
            if found is not None and (found[1] is not None or not codes):
                return found
        if codes:
            out, out_codes = self.quantizer.quantize_with_codes(x, self, layout)
        else:
            out, out_codes = self.quantizer.quantize(x, self), None
        if self.shared:
            self.memo.put(x, key, (out, out_codes))
        return out, out_codes

    def forget_memo(self) -> None:
        """Drop the remembered result (e.g. before a recomputation that must quantize afresh)."""
        self.__dict__.pop("_memo", None)

    @property
    def memo(self) -> InputMemo:
        """The last input's result (``shared`` quantizers; a plain attribute, not module state)."""
        memo = self.__dict__.get("_memo")
        if memo is None:
            memo = self.__dict__["_memo"] = InputMemo()
        return memo

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_memo", None)  # holds a weakref (not picklable) and a stale activation
        state.pop("_kdqat_int_memo", None)  # the same, for the integer backend (ds_kdqat.deploy.int_modules)
        return state

    def describe(self) -> str:
        return self.quantizer.describe_activation() + (f" clip={self.clip:g}" if self.clip is not None else "")

    def extra_repr(self) -> str:
        return self.describe()


class _QuantWeightMixin:
    """Fake-quantized weight, cached in eval mode under no_grad while the latent weight is unchanged.

    The cache key is the weight tensor's version counter and storage; in-place updates through autograd-visible
    ops (optimizer steps, ``load_state_dict``) change it, and ``train()`` clears it. Weights of DeepSpeed
    ZeRO-3 (re-gathered each forward) are never cached.
    """

    weight: nn.Parameter
    weight_quant: WeightQuantizer
    training: bool

    def quantized_weight(self) -> torch.Tensor:
        w = self.weight
        if self.training or torch.is_grad_enabled() or is_partitioned(w):
            return self.weight_quant(w)
        key = (w._version, w.data_ptr(), w.dtype, w.device, tuple(w.shape), self.weight_quant.version)
        cache = self.__dict__.get("_kdqat_qcache")
        if cache is not None and cache[0] == key:
            return cache[1]
        q = self.weight_quant(w)
        self.__dict__["_kdqat_qcache"] = (key, q)
        return q

    def quantized_weight_with_codes(self) -> tuple[torch.Tensor, Optional[Codes]]:
        """For a forward that records a graph: ``ŵ`` (straight-through gradient to the latent weight) and its
        integer codes, which autograd saves in place of ``ŵ``.

        While :attr:`reuse_within_step` is set (by the training loop, :func:`reuse_quantized_weights`), the codes
        are kept until :meth:`clear_quant_cache` (called after every optimizer step), so under gradient
        accumulation a weight is quantized once per optimizer step and later micro-batches only rebuild ``ŵ``
        from its codes. Weights of DeepSpeed ZeRO-3 are never kept (they are re-gathered each forward).
        """
        w, wq = self.weight, self.weight_quant
        if not self.__dict__.get("reuse_within_step") or wq.frozen or is_partitioned(w):
            return wq.with_codes(w)
        key = (w._version, w.data_ptr(), w.dtype, w.device, tuple(w.shape), wq.version)
        cache = self.__dict__.get("_kdqat_step_codes")
        if cache is not None and cache[0] == key:
            return wq.reattach(w, cache[1].values()), cache[1]
        w_hat, codes = wq.with_codes(w)
        if codes is not None:
            self.__dict__["_kdqat_step_codes"] = (key, codes)
        return w_hat, codes

    def clear_quant_cache(self) -> None:
        self.__dict__.pop("_kdqat_qcache", None)
        self.__dict__.pop("_kdqat_step_codes", None)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_kdqat_qcache", None)
        state.pop("_kdqat_step_codes", None)
        return state


class QuantLinear(_QuantWeightMixin, nn.Linear):
    """``y = Q_a(x) · Q_w(W)ᵀ + b``: linear layer with quantized weight and (optionally) quantized input.

    ``x`` (…, in_features) → (…, out_features). Parameters are the original module's (same names/objects).
    """

    act_quant: Optional[ActQuantizer]

    @classmethod
    def convert(cls, linear: nn.Linear, weight_quant: WeightQuantizer,
                act_quant: Optional[ActQuantizer] = None) -> "QuantLinear":
        """Turn ``linear`` (exactly ``nn.Linear``) into a QuantLinear in place and return it."""
        if type(linear) is not nn.Linear:
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
        linear.__class__ = cls
        linear.add_module("weight_quant", weight_quant)
        linear.add_module("act_quant", act_quant)
        return linear  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            if self.act_quant is not None:  # nothing is saved for a backward
                x = self.act_quant(x)
            return F.linear(x, self.quantized_weight(), self.bias)
        x_hat, x_codes = self.act_quant.with_codes(x, "contiguous") if self.act_quant is not None else (x, None)
        w_hat, w_codes = self.quantized_weight_with_codes()
        if self.__dict__.get("integer_forward") and x_codes is not None and w_codes is not None:
            out = integer_linear(x_hat, w_hat, self.bias, x_codes, w_codes)
            if out is not None:
                return out
        with saved_as_codes((x_hat, x_codes), (w_hat, w_codes)):
            return F.linear(x_hat, w_hat, self.bias)

    def train(self, mode: bool = True):
        self.clear_quant_cache()
        return super().train(mode)


class QuantEmbedding(_QuantWeightMixin, nn.Embedding):
    """Embedding lookup in the quantized table: ids (…) → (…, embedding_dim).

    With row-wise granularity and a method whose rows are quantized independently (and LAT reading the optimizer's
    second moment, whose rows are looked up with the weight's; not LAT with its own estimate, which needs the
    whole table's gradient) only the looked-up rows are quantized; this equals quantizing the table.
    """

    @classmethod
    def convert(cls, embedding: nn.Embedding, weight_quant: WeightQuantizer) -> "QuantEmbedding":
        if type(embedding) is not nn.Embedding:
            raise TypeError(f"expected an nn.Embedding, got {type(embedding).__name__}")
        embedding.__class__ = cls
        embedding.add_module("weight_quant", weight_quant)
        return embedding  # type: ignore[return-value]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        wq = self.weight_quant
        if wq.quantizes_rows and self.max_norm is None:
            rows = F.embedding(ids, self.weight, self.padding_idx, None, self.norm_type, self.scale_grad_by_freq,
                               self.sparse)
            flat = rows.reshape(-1, self.embedding_dim)
            return wq(flat, rows=ids.reshape(-1)).reshape(rows.shape)
        return F.embedding(ids, self.quantized_weight(), self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)

    def train(self, mode: bool = True):
        self.clear_quant_cache()
        return super().train(mode)


QUANT_MODULE_TYPES = (QuantLinear, QuantEmbedding)


def reuse_quantized_weights(model: nn.Module, enabled: bool = True) -> int:
    """Let ``model``'s quantized linears keep their weights' codes from one forward to the next until
    :func:`clear_quant_caches` (see :meth:`_QuantWeightMixin.quantized_weight_with_codes`): the training loop
    enables it and clears after every optimizer step, so a weight is quantized once per step, not once per
    micro-batch. Returns the number of linears affected."""
    count = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.__dict__["reuse_within_step"] = enabled
            module.clear_quant_cache()
            count += 1
    return count


def clear_quant_caches(model: nn.Module) -> None:
    """Drop every kept quantized weight of ``model`` (after an optimizer step, the latent weights changed)."""
    for module in model.modules():
        if isinstance(module, QUANT_MODULE_TYPES):
            module.clear_quant_cache()
