"""Integer-kernel modules that take the place of a student's fake-quant linears and embeddings.

:class:`IntLinear` holds a quantized weight as int8 codes with its scale (1 byte per weight, a quarter of fp32)
and computes ``y = x̂·Ŵᵀ + b`` with an integer GEMM of exact int32 sums: its input is encoded to integer codes by
the trained activation quantizer's own rule (the current batch's min-max or symmetric statistics, or the learned
LSQ step). Two kernels: oneDNN's u8 × s8 quantized linear with the float scaling fused into it
(:func:`~ds_kdqat.deploy.int_ops.onednn_linear`, used for resident int8 codes where this PyTorch build has it:
:func:`use_onednn`), else ``torch._int_mm`` and an in-place float epilogue
(:func:`~ds_kdqat.deploy.int_ops.int_linear`); both give the same codes and sums, their float roundings of the
scaling differ in the last bits. :class:`IntEmbedding` holds the table as its unsigned codes and decodes only the
rows it looks up, with the method's own arithmetic, so its output equals the fake-quant table's rows bit for bit.

Weight modes (:data:`WEIGHT_MODES`, ``integerize(model, weights=…)``): ``"int8"`` keeps one int8 code per
weight; ``"packed2"`` keeps the codes of weights of 2 bits or fewer (ternary, binary; the embedding table's too)
packed 4 to a byte (:func:`~ds_kdqat.deploy.int_ops.pack2`) and unpacks a linear's codes just before its GEMM
into one int8 buffer that the model's linears share (:class:`~ds_kdqat.deploy.int_ops.CodeScratch`): a quarter
of int8's weight memory for an unpacking pass per linear and forward. Wider weights (8-bit, 4-bit) stay int8.
With the same kernel (``onednn=False``) the outputs of the two modes are identical.

The linears of a layer that read one input through one quantizer (Q, K and V; a gated FFN's two input
projections) run as one GEMM over their concatenated codes (:class:`FusedProjections`, :func:`fuse_projections`):
per output column the same int32 sums and the same float epilogue, so the same outputs as one GEMM each.

The quantizers before the two attention matmuls stay the model's :class:`~ds_kdqat.quant.modules.ActQuantizer`
modules, each run through an :class:`IntAttentionQuantizer` (the same values, written contiguous): Q·Kᵀ and map·V
run on the quantized values in float32 (the same values as the trained student's; these matmuls are about 3 % of
BERT-base's multiply-adds at sequence length 128, and a quarter of the int8 backend's time at batch 8).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ds_kdqat.deploy.int_ops import (
    ACTIVATION_ENCODERS,
    INT8_MAX_BITS,
    ONEDNN_ZERO_POINT,
    CodeScratch,
    IntTensor,
    OnednnWeight,
    fake_lsq,
    fake_uniform,
    has_onednn_linear,
    int8_matmul,
    linear_epilogue_,
    onednn_linear,
    pack2,
    unpack2,
    weight_int_form,
)
from ds_kdqat.errors import ConfigError
from ds_kdqat.quant.methods import QUANT_METHODS
from ds_kdqat.quant.modules import (
    QUANT_MODULE_TYPES,
    ActQuantizer,
    InputMemo,
    QuantEmbedding,
    QuantLinear,
    version_key,
)

WEIGHT_MODES = ("int8", "packed2")
"""How the integer backend holds weight codes: one int8 per code, or (2 bits or fewer) 4 codes per byte."""
PACKED2_MAX_BITS = 2

# roles whose linears read one input tensor per layer (a gated FFN has several ffn_in linears)
FUSABLE_ROLES = (("query", "key", "value"), ("ffn_in",))


def check_weight_mode(weights: str, path: str = "weights") -> str:
    """``weights`` when it is one of :data:`WEIGHT_MODES`; a :class:`ConfigError` at ``path`` otherwise."""
    if weights not in WEIGHT_MODES:
        raise ConfigError(path, f"got {weights!r}, expected one of {list(WEIGHT_MODES)} (int8: one byte per weight "
                                "code; packed2: 2-bit codes packed 4 per byte, unpacked per linear before its GEMM)")
    return weights


def _owned(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A float32 copy of ``t`` that shares no memory with it (a tensor read from the export file keeps the whole
    file mapping resident while it lives)."""
    return None if t is None else t.detach().to(torch.float32, copy=True)


def integer_activation_supported(quantizer: ActQuantizer) -> Optional[str]:
    """None when ``quantizer``'s codes fit int8 and have an encoder; otherwise why not."""
    if quantizer.method not in ACTIVATION_ENCODERS:
        return f"activation method {quantizer.method!r} has no integer encoder"
    if quantizer.bits > INT8_MAX_BITS:
        return f"{quantizer.bits}-bit activations do not fit int8 codes"
    return None


def encode_activation(quantizer: ActQuantizer, x: torch.Tensor, zero_point: int = 0,
                      kernels: Optional[Any] = None) -> IntTensor:
    """``x`` (any shape) → its codes by ``quantizer``'s rule (the codes its fake-quant forward uses): int8 ``Q``,
    or with ``zero_point`` 128 uint8 ``Q + 128`` (for oneDNN's u8 × s8 kernel). ``kernels``: a
    :class:`~ds_kdqat.deploy.int_compiled.CompiledKernels` to compute them with (the same codes), or None."""
    if kernels is not None:
        return kernels.encode(quantizer, x, zero_point)
    if quantizer.method == "lsq":
        return ACTIVATION_ENCODERS["lsq"](x, quantizer.bits, quantizer.quantizer.step(quantizer).detach(), zero_point)
    return ACTIVATION_ENCODERS[quantizer.method](x, quantizer.bits, quantizer.mode, quantizer.clip, zero_point)


class _CodeHolder:
    """How a linear module keeps its int8 weight codes (N, K), and its integer product.

    One of: as they are (buffer ``weight_codes``); packed 4 to a byte (buffer ``weight_packed``,
    :func:`~ds_kdqat.deploy.int_ops.pack2`), unpacked on use into the shared :class:`CodeScratch`
    (``_code_scratch``, a plain attribute: not module state); or prepacked for oneDNN's fused kernel
    (``_onednn``, an :class:`~ds_kdqat.deploy.int_ops.OnednnWeight`, plain attribute: :meth:`use_onednn`). A
    module holding oneDNN's form gives it up while it is moved or cast (``.to``, ``.float()``, …) and takes it
    again afterwards where it still applies.

    The module defines ``weight_scale``, ``weight_shift``, ``code_sums``, ``bias``, ``act_quant`` and
    ``_encode(x, zero_point)`` (``x`` (…, K) → its codes (M, K)).
    """

    weight_codes: Optional[torch.Tensor]
    weight_packed: Optional[torch.Tensor]
    code_shape: tuple[int, int]

    def _hold_codes(self, codes: torch.Tensor, packed: bool) -> None:
        self.code_shape = tuple(codes.shape)
        self.register_buffer("weight_codes", None if packed else codes.contiguous(), persistent=False)
        self.register_buffer("weight_packed", pack2(codes) if packed else None, persistent=False)

    @property
    def packed(self) -> bool:
        return self.weight_packed is not None

    @property
    def onednn(self) -> Optional[OnednnWeight]:
        return self.__dict__.get("_onednn")

    @property
    def kernels(self) -> Optional[Any]:
        """The compiled element-wise kernels this module encodes its input with, or None (eager)."""
        return self.__dict__.get("_kernels")

    def _scratch(self) -> CodeScratch:
        scratch = self.__dict__.get("_code_scratch")
        if scratch is None:
            scratch = self.__dict__["_code_scratch"] = CodeScratch()
        return scratch

    def use_scratch(self, scratch: CodeScratch) -> None:
        """Unpack into ``scratch`` (shared by the model's packed modules) from now on."""
        self.__dict__["_code_scratch"] = scratch

    def use_onednn(self) -> bool:
        """Run the integer product by oneDNN's fused kernel (:func:`~ds_kdqat.deploy.int_ops.onednn_linear`):
        its codes are prepacked and the plain ones dropped. Only for resident int8 codes on the CPU, weights
        without a shift, an activation quantizer, and a build where the kernel runs; returns whether it does."""
        if self.onednn is not None:
            return True
        codes = self.weight_codes
        if codes is None or codes.device.type != "cpu" or self.weight_shift is not None or self.act_quant is None \
                or not has_onednn_linear():
            return False
        self.__dict__["_onednn"] = OnednnWeight(codes, self.weight_scale)
        self.weight_codes = None
        return True

    def _drop_onednn(self) -> bool:
        """Back to plain int8 codes; returns whether the module held oneDNN's form."""
        held = self.__dict__.pop("_onednn", None)
        if held is None:
            return False
        self.weight_codes = held.codes()
        return True

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_weight_read", None)
        had = self._drop_onednn()
        module = super()._apply(fn, recurse)
        if had:
            self.use_onednn()
        return module

    def _gemm_codes(self) -> torch.Tensor:
        """The int8 codes (N, K) for the next int8 GEMM: the resident codes, or the packed ones unpacked into
        the scratch buffer (valid until the next unpack in this thread)."""
        if self.weight_packed is None:
            return self.weight_codes if self.onednn is None else self.onednn.codes()
        count = self.code_shape[0] * self.code_shape[1]
        buffer = self._scratch().take(4 * self.weight_packed.numel(), self.weight_packed.device)
        return unpack2(self.weight_packed, count, buffer).view(self.code_shape)

    def _codes_copy(self) -> torch.Tensor:
        """The int8 codes (N, K) as a tensor of their own (unpacked into new memory when not resident)."""
        if self.weight_packed is not None:
            return unpack2(self.weight_packed, self.code_shape[0] * self.code_shape[1]).view(self.code_shape)
        return self.weight_codes if self.onednn is None else self.onednn.codes()

    def _int_product(self, x: torch.Tensor) -> torch.Tensor:
        """``x̂·Ŵᵀ + b`` (M, N) float32 for input ``x`` (…, K) (M rows), encoded by the module's quantizer."""
        onednn = self.onednn
        if onednn is not None:
            return onednn_linear(self._encode(x, ONEDNN_ZERO_POINT), onednn, self.code_sums, self.bias)
        encoded = self._encode(x, 0)
        acc = int8_matmul(encoded.codes, self._gemm_codes().t())
        return linear_epilogue_(acc, encoded, self.weight_scale, self.weight_shift, self.code_sums, self.bias)


class IntLinear(_CodeHolder, nn.Module):
    """``y = x̂·Ŵᵀ + b`` on int8 codes: (…, in_features) → (…, out_features).

    Buffers (not persistent: an integer model is built from a packed export, not saved): ``weight_codes``
    (out, in) int8, or with ``packed=True`` (codes in [−2, 1]: weights of 2 bits or fewer) ``weight_packed``
    (⌈out·in/4⌉,) uint8 instead (or neither: oneDNN's prepacked form, see :class:`_CodeHolder`);
    ``weight_scale``/``weight_shift`` () or (out,), ``code_sums`` (out,). ``act_quant``: the trained input
    quantizer (shared by Q, K and V of a layer: their common input is encoded once per forward), or None for
    weight-only quantization (the weight is then decoded each forward and the GEMM is float). ``fused``: the
    :class:`FusedProjections` that holds this linear's codes and computes it with its siblings, or None.
    """

    def __init__(self, weight: IntTensor, bias: Optional[torch.Tensor], act_quant: Optional[ActQuantizer], *,
                 packed: bool = False):
        super().__init__()
        self.out_features, self.in_features = weight.codes.shape
        self._hold_codes(weight.codes, packed)
        self.register_buffer("weight_scale", _owned(weight.scale), persistent=False)
        self.register_buffer("weight_shift", _owned(weight.shift), persistent=False)
        self.register_buffer("code_sums", weight.codes.sum(dim=1, dtype=torch.int32).float(), persistent=False)
        # the bias keeps its state-dict name so the packed export's "<module>.bias" loads into it
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.act_quant = act_quant
        self.fused: Optional[FusedProjections] = None
        self.fused_index = -1

    @property
    def weight(self) -> torch.Tensor:
        """The int8 codes (out, in), under the name model code reads (HF's T5 reads ``wo.weight`` three times a
        forward to check its dtype, and leaves an int8 weight's input in its own dtype). Codes held as a plain
        tensor are that tensor; others (packed, prepacked, fused) are unpacked on the first read into a new
        tensor, which later reads return until the module's next forward or move: the reads before a forward
        unpack once. Decoded values: ``weight_int.dequantize()``."""
        if self.fused is None and self.weight_codes is not None:
            return self.weight_codes
        held = self.__dict__.get("_weight_read")
        if held is None:
            held = self.fused.member_codes(self.fused_index) if self.fused is not None else self._codes_copy()
            self.__dict__["_weight_read"] = held
        return held

    @property
    def weight_int(self) -> IntTensor:
        return IntTensor(self.weight, self.weight_scale, self.weight_shift)

    def _encode(self, x: torch.Tensor, zero_point: int) -> IntTensor:
        """``x``'s codes as (tokens, in_features); Q, K and V share one input tensor: it is encoded once (a memo
        keyed on the input tensor itself, not on a reshaped view of it)."""
        quantizer, kernels = self.act_quant, self.kernels
        if not quantizer.shared:
            return encode_activation(quantizer, x.reshape(-1, self.in_features), zero_point, kernels)
        memo = quantizer.__dict__.get("_kdqat_int_memo")
        if memo is None:
            memo = quantizer.__dict__["_kdqat_int_memo"] = InputMemo()
        key = (version_key(x), zero_point)
        encoded = memo.get(x, key)
        if encoded is None:
            encoded = encode_activation(quantizer, x.reshape(-1, self.in_features), zero_point, kernels)
            memo.put(x, key, encoded)
        return encoded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.__dict__.pop("_weight_read", None)
        if self.fused is not None:
            return self.fused(self.fused_index, x)
        if self.act_quant is None:
            weight = IntTensor(self._gemm_codes(), self.weight_scale, self.weight_shift).dequantize()
            out = F.linear(x.reshape(-1, self.in_features).float(), weight, self.bias)
        else:
            out = self._int_product(x)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        act = self.act_quant.describe() if self.act_quant is not None else "float input"
        if self.fused is not None:
            held = f"one GEMM with its {len(self.fused.bounds) - 1} sibling(s) ({self.fused.held()})"
        else:
            held = self.held()
        return f"in_features={self.in_features}, out_features={self.out_features}, {held}, {act}"

    def held(self) -> str:
        return "2-bit packed codes" if self.packed else "int8 codes (oneDNN)" if self.onednn else "int8 codes"


class FusedProjections(_CodeHolder, nn.Module):
    """Linears that read one input through one quantizer (Q, K and V of a layer), as one GEMM:
    (…, K) → one (…, N_j) output per member, from the codes concatenated along the output features.

    ``x̂`` is encoded once, ``acc = Q_x·[Q_1; Q_2; …]ᵀ`` (M, ΣN_j) int32 in one GEMM, then one epilogue with each
    member's per-tensor (or per-row) scale, shift, code sums and bias laid out per output column: column by column
    the same int32 sums and float operations as each member's own :func:`~ds_kdqat.deploy.int_ops.int_linear`,
    so the same outputs. The first member called with an input computes all outputs (column slices of one
    buffer); the others take theirs from a memo that holds them only until every member has had its output (or
    the input is freed). This module holds the members' codes (they hold none); they keep their own scales and
    code sums, and their bias becomes a view of this module's.
    """

    def __init__(self, members: list[IntLinear]):
        super().__init__()
        if len(members) < 2 or len({(m.in_features, id(m.act_quant)) for m in members}) != 1 \
                or members[0].act_quant is None:
            raise ValueError("fused projections need two or more linears with one input quantizer and input width")
        self.in_features = members[0].in_features
        self.out_features = sum(m.out_features for m in members)
        self.__dict__["act_quant"] = members[0].act_quant  # the members own it (not registered twice)
        edges = [0]
        for m in members:
            edges.append(edges[-1] + m.out_features)
        self.bounds = list(zip(edges[:-1], edges[1:]))
        self._hold_codes(torch.cat([m._codes_copy() for m in members]), all(m.packed for m in members))

        def per_column(values: list[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
            if all(v is None for v in values):
                return None
            return torch.cat([torch.zeros(m.out_features) if v is None else v.float().expand(m.out_features)
                              for m, v in zip(members, values)]).contiguous()

        self.register_buffer("weight_scale", per_column([m.weight_scale for m in members]), persistent=False)
        self.register_buffer("weight_shift", per_column([m.weight_shift for m in members]), persistent=False)
        self.register_buffer("code_sums", per_column([m.code_sums for m in members]), persistent=False)
        self.register_buffer("bias", per_column([None if m.bias is None else m.bias.detach() for m in members]),
                             persistent=False)
        self._memo = InputMemo()

    def held(self) -> str:
        codes = "2-bit packed" if self.packed else "int8 (oneDNN)" if self.onednn else "int8"
        return f"{codes} {self.out_features}×{self.in_features}"

    def adopt(self, members: list[IntLinear]) -> None:
        """Point ``members`` at this module: their forward asks it for their output, their codes are dropped (it
        holds them), and their bias becomes a view of its own, so a later ``load_state_dict`` of a member's bias
        reaches the fused GEMM."""
        for index, (member, (start, stop)) in enumerate(zip(members, self.bounds)):
            if member.bias is not None:
                member.bias = nn.Parameter(self.bias[start:stop], requires_grad=False)
            member._drop_onednn()
            member.weight_codes = member.weight_packed = None
            member.fused, member.fused_index = self, index

    def member_codes(self, index: int) -> torch.Tensor:
        """Member ``index``'s int8 codes (N_j, K), a tensor of their own."""
        start, stop = self.bounds[index]
        return self._codes_copy()[start:stop].clone()

    def _encode(self, x: torch.Tensor, zero_point: int) -> IntTensor:
        return encode_activation(self.act_quant, x.reshape(-1, self.in_features), zero_point, self.kernels)

    def _project(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every member's output for input ``x`` (…, K): column slices (views) of one (M, ΣN_j) float buffer."""
        out = self._int_product(x)
        return [out[:, start:stop].to(x.dtype).reshape(*x.shape[:-1], stop - start) for start, stop in self.bounds]

    def forward(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Member ``index``'s output for ``x``: computed with all the others' on the first call for ``x``."""
        key = version_key(x)
        held = self._memo.get(x, key)
        if held is None:
            held = (self._project(x), set(range(len(self.bounds))))
            self._memo.put(x, key, held)
        outputs, waiting = held
        waiting.discard(index)
        if not waiting:
            self._memo.clear()
        return outputs[index]

    def extra_repr(self) -> str:
        return f"{len(self.bounds)} linears as one GEMM, {self.held()}"


class IntAttentionQuantizer(nn.Module):
    """An attention matmul's input quantizer (``query``, ``key``, ``value``, ``map``) in the integer backend:
    the model's :class:`~ds_kdqat.quant.modules.ActQuantizer` (``quantizer``) computing the same values without
    autograd by one lean call (:func:`~ds_kdqat.deploy.int_ops.fake_uniform`, :func:`~ds_kdqat.deploy.int_ops.
    fake_lsq`) into a contiguous tensor: Q, K and V arrive as strided views of their projection, and the batched
    matmuls after them read contiguous operands faster. Anything else (autograd, other methods) goes to the
    quantizer itself. (B, H, S, ·) → same shape."""

    def __init__(self, quantizer: ActQuantizer):
        super().__init__()
        self.quantizer = quantizer

    @property
    def kernels(self) -> Optional[Any]:
        """The compiled element-wise kernels this quantizer runs by, or None (eager)."""
        return self.__dict__.get("_kernels")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.quantizer
        if torch.is_grad_enabled() and x.requires_grad:
            return q(x)
        if self.kernels is not None and q.method in ("uniform", "lsq"):
            return self.kernels.fake(q, x)
        if q.method == "uniform":
            return fake_uniform(x, q.bits, q.mode, q.clip)
        if q.method == "lsq":
            return fake_lsq(x, q.bits, q.quantizer.step(q).detach())
        return q(x)

    def extra_repr(self) -> str:
        return "contiguous output, no autograd"


class IntEmbedding(nn.Module):
    """Lookup in a quantized table kept as its unsigned codes: ids (…) → (…, embedding_dim).

    ``codes`` (vocab, dim) uint8 as the packed export stores them, or with ``packed=True`` (codes of 2 bits or
    fewer) ``codes_packed`` (vocab, ⌈dim/4⌉) uint8: per row, byte ``j`` holds the codes of columns ``j``,
    ``D + j``, ``2D + j``, ``3D + j`` (``D = ⌈dim/4⌉``) in its bits 0–1, 2–3, 4–5, 6–7; only the looked-up rows
    are unpacked. ``scale``/``offset`` as stored (``()`` or ``(vocab, 1)``). Only the looked-up rows are decoded,
    by the method's own ``decode``.
    """

    def __init__(self, method: str, kind: str, bits: int, codes: torch.Tensor, scale: torch.Tensor,
                 offset: Optional[torch.Tensor], padding_idx: Optional[int], *, packed: bool = False):
        super().__init__()
        self.method, self.kind, self.bits, self.padding_idx = method, kind, bits, padding_idx
        self.num_embeddings, self.embedding_dim = codes.shape
        codes = codes.to(torch.uint8)
        if packed and bits > PACKED2_MAX_BITS:
            raise ValueError(f"{bits}-bit codes do not pack 4 to a byte")
        self.register_buffer("codes", None if packed else codes.contiguous(), persistent=False)
        self.register_buffer("codes_packed", self._pack_rows(codes) if packed else None, persistent=False)
        self.register_buffer("scale", _owned(scale), persistent=False)
        self.register_buffer("offset", _owned(offset), persistent=False)

    @staticmethod
    def _pack_rows(codes: torch.Tensor) -> torch.Tensor:
        """(rows, dim) uint8 codes in [0, 3] → (rows, ⌈dim/4⌉) uint8 (the class docstring's row layout)."""
        rows, dim = codes.shape
        quarter = -(-dim // 4)
        padded = torch.zeros(rows, 4, quarter, dtype=torch.uint8)
        padded.view(rows, 4 * quarter)[:, :dim] = codes
        return padded[:, 0] | (padded[:, 1] << 2) | (padded[:, 2] << 4) | (padded[:, 3] << 6)

    def _unpack_rows(self, packed: torch.Tensor) -> torch.Tensor:
        """(n, ⌈dim/4⌉) packed rows → (n, dim) uint8 codes."""
        n, quarter = packed.shape
        out = torch.empty(n, 4, quarter, dtype=torch.uint8, device=packed.device)
        for i in range(4):
            torch.bitwise_right_shift(packed, 2 * i, out=out[:, i])
        return out.bitwise_and_(3).view(n, 4 * quarter)[:, : self.embedding_dim]

    def _code_rows(self, flat_ids: Optional[torch.Tensor]) -> torch.Tensor:
        """The codes of rows ``flat_ids`` (n,) (every row when None) as (n, dim) uint8."""
        if self.codes_packed is None:
            return self.codes if flat_ids is None else self.codes[flat_ids]
        return self._unpack_rows(self.codes_packed if flat_ids is None else self.codes_packed[flat_ids])

    def _rows(self, t: Optional[torch.Tensor], ids: torch.Tensor) -> Optional[torch.Tensor]:
        if t is None or t.dim() == 0 or t.shape[0] == 1 and self.num_embeddings != 1:
            return t
        return t[ids]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = QUANT_METHODS[self.method].decode(self.kind, self.bits, self._code_rows(flat),
                                                 self._rows(self.scale, flat), self._rows(self.offset, flat))
        return rows.reshape(*ids.shape, self.embedding_dim)

    @property
    def weight(self) -> torch.Tensor:
        """The decoded table (vocab, dim) float32, for code that reads an embedding's weight (built on use)."""
        return QUANT_METHODS[self.method].decode(self.kind, self.bits, self._code_rows(None), self.scale,
                                                 self.offset)

    def extra_repr(self) -> str:
        held = ", packed 4 per byte" if self.codes_packed is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.kind} {self.bits}-bit codes{held}"


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
                   scale: torch.Tensor, offset: Optional[torch.Tensor],
                   weights: str = "int8") -> tuple[Optional[nn.Module], str]:
    """The integer module for quantized ``module`` from its unsigned ``codes`` (weight-shaped), or
    ``(None, why)`` when it must stay fake-quant. ``weights`` (:data:`WEIGHT_MODES`): ``"packed2"`` packs the
    codes of weights of 2 bits or fewer 4 to a byte (the others stay int8)."""
    check_weight_mode(weights)
    if bits > INT8_MAX_BITS or kind not in ("ternary", "binary", "symmetric", "minmax"):
        return None, f"{kind} {bits}-bit weights have no int8 form"
    packed = weights == "packed2" and bits <= PACKED2_MAX_BITS
    if isinstance(module, QuantEmbedding):
        if module.max_norm is not None:
            return None, "max_norm renormalises looked-up rows"
        return IntEmbedding(method, kind, bits, codes, scale, offset, module.padding_idx, packed=packed), ""
    if isinstance(module, QuantLinear):
        act = module.act_quant
        if act is not None:
            why = integer_activation_supported(act)
            if why:
                return None, why
        return IntLinear(weight_int_form(kind, bits, codes, scale, offset), module.bias, act, packed=packed), ""
    return None, f"{type(module).__name__} is not a quantized linear or embedding"


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _fusable_groups(model: nn.Module) -> list[list[IntLinear]]:
    """Sets of :class:`IntLinear` that read one input: per layer (module parent) and role set of
    :data:`FUSABLE_ROLES` (by the model family's adapter), those sharing one input quantizer and input width.
    A model without a family adapter has none."""
    from ds_kdqat.models.families import adapter_for

    try:
        adapter = adapter_for(model)
    except ValueError:
        return []
    groups: dict[tuple, list[IntLinear]] = {}
    for k, roles in enumerate(FUSABLE_ROLES):
        for role in roles:
            for name, module in adapter.role_modules(model, role):
                if isinstance(module, IntLinear) and module.act_quant is not None and module.act_quant.shared \
                        and module.fused is None:
                    key = (k, name.rpartition(".")[0], id(module.act_quant), module.in_features)
                    groups.setdefault(key, []).append(module)
    return [members for members in groups.values() if len(members) > 1]


def fuse_projections(model: nn.Module) -> int:
    """Let the linears of an integer model that read one input (Q, K and V of each layer; a gated FFN's input
    projections) run as one GEMM each (:class:`FusedProjections`); returns the number of fused groups. Call it
    once the model's weights and biases are loaded."""
    groups = _fusable_groups(model)
    for members in groups:
        fused = FusedProjections(members)
        fused.adopt(members)
    return len(groups)


def share_code_scratch(model: nn.Module) -> Optional[CodeScratch]:
    """One :class:`CodeScratch` for every packed module of ``model`` (their unpacked codes take the memory of the
    largest one only); returns it, or None when nothing is packed."""
    packed = [m for m in model.modules() if isinstance(m, _CodeHolder) and m.packed]
    if not packed:
        return None
    scratch = CodeScratch()
    for module in packed:
        module.use_scratch(scratch)
    return scratch


def use_onednn(model: nn.Module) -> int:
    """Let every linear of ``model`` that holds resident int8 codes run by oneDNN's fused u8 × s8 kernel where
    it can (:meth:`_CodeHolder.use_onednn`); returns how many do."""
    return sum(m.use_onednn() for m in model.modules() if isinstance(m, _CodeHolder) and m.weight_codes is not None)


def lean_attention_quantizers(model: nn.Module) -> int:
    """Put an :class:`IntAttentionQuantizer` around each attention matmul input quantizer of ``model`` (the
    ``kdqat_act_quant`` entries of its self-attention modules); returns how many."""
    count = 0
    for module in model.modules():
        quantizers = getattr(module, "kdqat_act_quant", None)
        if not isinstance(quantizers, nn.ModuleDict):
            continue
        for point, quantizer in list(quantizers.items()):
            if isinstance(quantizer, ActQuantizer):
                quantizers[point] = IntAttentionQuantizer(quantizer)
                count += 1
    return count


def use_compiled_kernels(model: nn.Module, enabled: bool = True) -> int:
    """Let the integer linears and attention quantizers of ``model`` run their element-wise work by compiled
    kernels (:func:`ds_kdqat.deploy.int_compiled.compiled_kernels`: the same codes and values; compiled on first
    use), or by the eager ones again (``enabled=False``); returns how many modules were set."""
    from ds_kdqat.deploy.int_compiled import compiled_kernels

    kernels = compiled_kernels() if enabled else None
    modules = [m for m in model.modules() if isinstance(m, (_CodeHolder, IntAttentionQuantizer))]
    for module in modules:
        module.__dict__["_kernels"] = kernels
    return len(modules)


def finish_integer_model(model: nn.Module, fuse: bool = True, onednn: bool = True,
                         compile: bool = False) -> nn.Module:
    """The last steps of building an integer model, once everything is loaded: fuse the projections that read
    one input (``fuse``), run the linears with resident int8 codes by oneDNN's fused kernel where it runs
    (``onednn``; its float epilogue rounds in its own order: the outputs differ from the int8 GEMM's in the
    last bits), give the attention quantizers contiguous outputs (the same values), share one unpacking
    buffer between the packed modules, and (``compile``) run the element-wise work by compiled kernels
    (:func:`use_compiled_kernels`). Returns ``model``."""
    lean_attention_quantizers(model)
    if fuse:
        fuse_projections(model)
    if onednn:
        use_onednn(model)
    share_code_scratch(model)
    if compile:
        use_compiled_kernels(model)
    return model


@torch.no_grad()
def integerize(model: nn.Module, weights: str = "int8", fuse: bool = True, onednn: bool = True,
               compile: bool = False) -> IntegerReport:
    """Turn a trained fake-quant student (not ``frozen``: its latent weights are what it trained) into its
    integer form in place; return what changed. ``weights``: how the codes are held (:data:`WEIGHT_MODES`);
    ``fuse``: Q, K and V (and a gated FFN's input projections) as one GEMM; ``onednn``: resident int8 codes run
    by oneDNN's fused kernel where it runs; ``compile``: compiled element-wise kernels (:func:`finish_integer_model`).
    A student loaded from a packed export
    is already decoded: build its integer form from the export with ``ds_kdqat.load_student(path,
    backend="int8")``."""
    check_weight_mode(weights)
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
        new, why = integer_module(module, quant.method, parts.kind, parts.bits, codes, parts.scale, parts.offset,
                                  weights)
        if new is None:
            report.kept[name] = why
            continue
        replace_module(model, name, new)
        (report.embeddings if isinstance(new, IntEmbedding) else report.integer).append(name)
    finish_integer_model(model, fuse, onednn, compile)
    return report
