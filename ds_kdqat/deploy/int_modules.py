"""Integer-kernel modules that take the place of a student's fake-quant linears and embeddings.

:class:`IntLinear` holds a quantized weight as int8 codes with its scale (1 byte per weight, a quarter of fp32)
and computes ``y = x̂·Ŵᵀ + b`` with an int8 × int8 → int32 GEMM (:func:`ds_kdqat.deploy.int_ops.int_linear`):
its input is encoded to int8 codes by the trained activation quantizer's own rule (the current batch's
min-max or symmetric statistics, or the learned LSQ step). :class:`IntEmbedding` holds the table as its
unsigned codes and decodes only the rows it looks up, with the method's own arithmetic, so its output equals
the fake-quant table's rows bit for bit.

The quantizers before the two attention matmuls stay the model's :class:`~ds_kdqat.quant.modules.ActQuantizer`
modules: Q·Kᵀ and map·V run on the quantized values in float32 (the same values as the trained student's;
these matmuls are about 3 % of BERT-base's multiply-adds at sequence length 128).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ds_kdqat.deploy.int_ops import ACTIVATION_ENCODERS, INT8_MAX_BITS, IntTensor, int_linear, weight_int_form
from ds_kdqat.quant.methods import QUANT_METHODS
from ds_kdqat.quant.modules import (
    QUANT_MODULE_TYPES,
    ActQuantizer,
    InputMemo,
    QuantEmbedding,
    QuantLinear,
    version_key,
)


def integer_activation_supported(quantizer: ActQuantizer) -> Optional[str]:
    """None when ``quantizer``'s codes fit int8 and have an encoder; otherwise why not."""
    if quantizer.method not in ACTIVATION_ENCODERS:
        return f"activation method {quantizer.method!r} has no integer encoder"
    if quantizer.bits > INT8_MAX_BITS:
        return f"{quantizer.bits}-bit activations do not fit int8 codes"
    return None


def encode_activation(quantizer: ActQuantizer, x: torch.Tensor) -> IntTensor:
    """``x`` (any shape) → its int8 codes by ``quantizer``'s rule (the codes its fake-quant forward uses)."""
    if quantizer.method == "lsq":
        return ACTIVATION_ENCODERS["lsq"](x, quantizer.bits, quantizer.quantizer.step(quantizer).detach())
    return ACTIVATION_ENCODERS[quantizer.method](x, quantizer.bits, quantizer.mode, quantizer.clip)


class IntLinear(nn.Module):
    """``y = x̂·Ŵᵀ + b`` on int8 codes: (…, in_features) → (…, out_features).

    Buffers (not persistent: an integer model is built from a packed export, not saved): ``weight_codes``
    (out, in) int8, ``weight_scale``/``weight_shift`` () or (out,), ``code_sums`` (out,). ``act_quant``: the
    trained input quantizer (shared by Q, K and V of a layer: their common input is encoded once per forward),
    or None for weight-only quantization (the weight is then decoded each forward and the GEMM is float).
    """

    def __init__(self, weight: IntTensor, bias: Optional[torch.Tensor], act_quant: Optional[ActQuantizer]):
        super().__init__()
        self.out_features, self.in_features = weight.codes.shape
        self.register_buffer("weight_codes", weight.codes.contiguous(), persistent=False)
        self.register_buffer("weight_scale", weight.scale.float(), persistent=False)
        self.register_buffer("weight_shift", None if weight.shift is None else weight.shift.float(), persistent=False)
        self.register_buffer("code_sums", weight.codes.sum(dim=1, dtype=torch.int32).float(), persistent=False)
        # the bias keeps its state-dict name so the packed export's "<module>.bias" loads into it
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.act_quant = act_quant

    @property
    def weight(self) -> torch.Tensor:
        """The int8 codes (out, in), under the name model code reads (HF's T5 checks ``wo.weight.dtype`` and
        leaves an int8 weight's input in its own dtype). Decoded values: ``weight_int.dequantize()``."""
        return self.weight_codes

    @property
    def weight_int(self) -> IntTensor:
        return IntTensor(self.weight_codes, self.weight_scale, self.weight_shift)

    def _encoded(self, x: torch.Tensor) -> IntTensor:
        """``x``'s codes as (tokens, in_features); Q, K and V share one input tensor: it is encoded once."""
        quantizer = self.act_quant
        if not quantizer.shared:
            return encode_activation(quantizer, x.reshape(-1, self.in_features))
        memo = quantizer.__dict__.get("_kdqat_int_memo")
        if memo is None:
            memo = quantizer.__dict__["_kdqat_int_memo"] = InputMemo()
        encoded = memo.get(x, version_key(x))
        if encoded is None:
            encoded = encode_activation(quantizer, x.reshape(-1, self.in_features))
            memo.put(x, version_key(x), encoded)
        return encoded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self.act_quant is None:
            out = F.linear(x.reshape(-1, self.in_features).float(), self.weight_int.dequantize(), self.bias)
        else:
            out = int_linear(self._encoded(x), self.weight_codes.t(), self.weight_scale, self.weight_shift,
                             self.code_sums, self.bias)
        return out.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        act = self.act_quant.describe() if self.act_quant is not None else "float input"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights, {act}"


class IntEmbedding(nn.Module):
    """Lookup in a quantized table kept as its unsigned codes: ids (…) → (…, embedding_dim).

    ``codes`` (vocab, dim) uint8 as the packed export stores them; ``scale``/``offset`` as stored (``()`` or
    ``(vocab, 1)``). Only the looked-up rows are decoded, by the method's own ``decode``.
    """

    def __init__(self, method: str, kind: str, bits: int, codes: torch.Tensor, scale: torch.Tensor,
                 offset: Optional[torch.Tensor], padding_idx: Optional[int]):
        super().__init__()
        self.method, self.kind, self.bits, self.padding_idx = method, kind, bits, padding_idx
        self.num_embeddings, self.embedding_dim = codes.shape
        self.register_buffer("codes", codes.to(torch.uint8).contiguous(), persistent=False)
        self.register_buffer("scale", scale.float(), persistent=False)
        self.register_buffer("offset", None if offset is None else offset.float(), persistent=False)

    def _rows(self, t: Optional[torch.Tensor], ids: torch.Tensor) -> Optional[torch.Tensor]:
        if t is None or t.dim() == 0 or t.shape[0] == 1 and self.num_embeddings != 1:
            return t
        return t[ids]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = QUANT_METHODS[self.method].decode(self.kind, self.bits, self.codes[flat], self._rows(self.scale, flat),
                                                 self._rows(self.offset, flat))
        return rows.reshape(*ids.shape, self.embedding_dim)

    @property
    def weight(self) -> torch.Tensor:
        """The decoded table (vocab, dim) float32, for code that reads an embedding's weight (built on use)."""
        return QUANT_METHODS[self.method].decode(self.kind, self.bits, self.codes, self.scale, self.offset)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.kind} {self.bits}-bit codes"


@dataclass
class IntegerReport:
    """What :func:`integer_module` calls made: modules now integer, and those kept fake-quant with why."""

    integer: list[str] = field(default_factory=list)
    embeddings: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        text = f"{len(self.integer)} int8 linear, {len(self.embeddings)} int8 embedding"
        if self.kept:
            text += f"; kept fake-quant: {', '.join(f'{k} ({v})' for k, v in self.kept.items())}"
        return text


def integer_module(module: nn.Module, method: str, kind: str, bits: int, codes: torch.Tensor,
                   scale: torch.Tensor, offset: Optional[torch.Tensor]) -> tuple[Optional[nn.Module], str]:
    """The integer module for quantized ``module`` from its unsigned ``codes`` (weight-shaped), or
    ``(None, why)`` when it must stay fake-quant."""
    if bits > INT8_MAX_BITS or kind not in ("ternary", "binary", "symmetric", "minmax"):
        return None, f"{kind} {bits}-bit weights have no int8 form"
    if isinstance(module, QuantEmbedding):
        if module.max_norm is not None:
            return None, "max_norm renormalises looked-up rows"
        return IntEmbedding(method, kind, bits, codes, scale, offset, module.padding_idx), ""
    if isinstance(module, QuantLinear):
        act = module.act_quant
        if act is not None:
            why = integer_activation_supported(act)
            if why:
                return None, why
        return IntLinear(weight_int_form(kind, bits, codes, scale, offset), module.bias, act), ""
    return None, f"{type(module).__name__} is not a quantized linear or embedding"


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


@torch.no_grad()
def integerize(model: nn.Module) -> IntegerReport:
    """Turn a trained fake-quant student (not ``frozen``: its latent weights are what it trained) into its
    integer form in place; return what changed. A student loaded from a packed export is already decoded:
    build its integer form from the export with ``ds_kdqat.load_student(path, backend="int8")``."""
    report = IntegerReport()
    for name, module in list(model.named_modules()):
        if not isinstance(module, QUANT_MODULE_TYPES):
            continue
        quant = module.weight_quant
        if quant.frozen:
            raise ValueError(f"{name}: the weights are already decoded (a loaded export); load the export with "
                             "backend='int8' instead")
        parts = quant.parts(module.weight)
        codes = QUANT_METHODS[quant.method].encode(parts)
        new, why = integer_module(module, quant.method, parts.kind, parts.bits, codes, parts.scale, parts.offset)
        if new is None:
            report.kept[name] = why
            continue
        replace_module(model, name, new)
        (report.embeddings if isinstance(new, IntEmbedding) else report.integer).append(name)
    return report
