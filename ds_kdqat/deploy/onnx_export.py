"""ONNX export of a self-contained student export, with the linears as real integer ops.

:func:`export_onnx` loads the export with the ``"int8"`` backend (:mod:`ds_kdqat.deploy.int_modules`) and
writes ``<folder>/model.onnx``, then adds it to the manifest (``files`` and an ``"onnx"`` entry), so
``load_student(folder, "onnx")`` (:mod:`ds_kdqat.deploy.onnx_backend`) runs it with ONNX Runtime.

Each :class:`~ds_kdqat.deploy.int_modules.IntLinear` becomes (:class:`OnnxIntLinear`), for its input ``x``
(M tokens, K):

* the activation encoding of :func:`ds_kdqat.deploy.int_ops.uniform_codes` / ``lsq_codes`` (the int8
  backend's own function, so the codes are its ``Q_x``): min-max ``ReduceMin, ReduceMax → Sub → Div → Round``, symmetric
  ``Abs → ReduceMax → Clip → Div → Clip → Mul → Round``, LSQ ``Div → Clip → Round`` (``Clip`` first when
  the quantizer clips); the integer-valued result is then cast once to uint8 as ``Q_x + 128``
  (:data:`ACTIVATION_ZERO_POINT`). Q, K and V share their input and encode it once;
* ``MatMulInteger(Q_x + 128, Q_wᵀ, 128)``: ``(Q_x + 128 − 128)·Q_wᵀ`` in int32, exact; ``Q_wᵀ`` a (K, N) int8
  constant (uint8 ``Q_wᵀ + 128`` with zero point 128 for 8-bit weights, :data:`SIGNED_WEIGHT_LIMIT`);
* the float epilogue of :func:`ds_kdqat.deploy.int_ops.int_linear`:
  ``y = float(acc)·(a_x·a_w) + (a_w·Σ_k Q_w·b_x + bias)``, plus ``a_x·b_w·Σ_k Q_x + K·b_x·b_w`` for min-max
  weights. ONNX Runtime fuses ``MatMulInteger → Cast → Mul`` into its ``MatMulIntegerToFloat`` kernel.

So on the same input one linear's output equals the int8 backend's bit for bit (checked by the tests). The
whole model's logits agree up to float rounding: ONNX Runtime's LayerNorm, GELU, softmax and float matmuls
round differently from PyTorch's in the last bit, and now and then such a difference moves a value across a
rounding boundary of an 8-bit quantizer (one code, or a min/max and so a whole tensor's step).

Everything else (embeddings, LayerNorm, GELU, softmax, the attention quantizers, which stay fake-quant,
the float pooler/classifier) is traced as ordinary float ops. The graph is written by the TorchScript exporter
(``torch.onnx.export(..., dynamo=False)``): the integer product is a :class:`torch.autograd.Function` whose
``symbolic`` emits ``MatMulInteger``; the rest traces as it runs. The file holds one byte per quantized
weight (ONNX has no 2-bit GEMM input type): about 4× the packed ``weights.safetensors`` of a ternary model,
a quarter of fp32.

Supported families (:data:`ONNX_FAMILIES`): ``bert`` (BERT, RoBERTa, ELECTRA), ``distilbert``, ``t5`` (T5-style
encoders, relative position buckets traced for any sequence length) and ``vit``; task
heads: sequence classification / regression, extractive QA (text families) and image classification (ViT).
Inputs are named as the HF forward's arguments (``input_ids``, ``attention_mask``, ``token_type_ids`` when the
export's task uses them; ``pixel_values`` for images) with dynamic batch (and sequence) axes; outputs
``logits``, or ``start_logits``/``end_logits`` for QA.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ds_kdqat.deploy.int_modules import IntLinear, replace_module
from ds_kdqat.deploy.int_ops import IntTensor, has_int8_gemm, int8_matmul, lsq_codes, uniform_codes
from ds_kdqat.deploy.onnx_backend import ONNX_FILE, import_deploy_package
from ds_kdqat.errors import ConfigError
from ds_kdqat.fileio import atomic_write_text, atomic_write_via, sha256_file

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17
MIN_OPSET, MAX_OPSET = 14, 20  # the TorchScript exporter's range this module is checked with
MANIFEST_FILE = "manifest.json"

ONNX_FAMILIES = ("bert", "distilbert", "t5", "vit")
"""Families whose export traces to ONNX (see the module docstring); others raise :class:`ConfigError`."""


# --------------------------------------------------------------------------------------------------------------
# the integer product and the traceable integer linear


ACTIVATION_ZERO_POINT = 128
"""Activation codes enter ``MatMulInteger`` as ``uint8 = Q_x + 128`` with zero point 128, the same int32
product as ``Q_x`` itself: ONNX Runtime's x86 int8 GEMM (MLAS) has fast u8 × s8 kernels (VNNI ``vpdpbusd``),
while its s8 × s8 path was 14× slower (onnxruntime 1.32 on an AVX-512 VNNI CPU: 31 vs 444 GOP/s on
1024×768×3072)."""

SIGNED_WEIGHT_LIMIT = 64
"""Weights whose codes all satisfy ``|Q_w| ≤ 64`` (ternary, binary, symmetric up to 7 bits) stay int8 (u8 × s8);
wider codes go in as ``uint8 = Q_w + 128`` with zero point 128 (u8 × u8, about 2× slower). ONNX Runtime's
quantization notes warn that its u8 × s8 kernel for AVX2 CPUs without VNNI (``vpmaddubsw``) saturates when two
adjacent ``u8·s8`` products sum past ±32767 (``255·64·2`` does not) and recommend u8 × u8 against it."""


def _shift_to_uint8(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes ``Q`` (any shape) → uint8 ``Q + 128`` (exact: Cast int32, Add, Cast uint8)."""
    return (codes.to(torch.int32) + ACTIVATION_ZERO_POINT).to(torch.uint8)


@dataclass
class ShiftedCodes:
    """An encoded activation for ``MatMulInteger``: ``x̂ = scale·(codes − 128) + shift``; ``codes`` (M, K)
    uint8 (``Q_x + 128``), ``scale``/``shift`` () float32 (``shift`` None means 0)."""

    codes: torch.Tensor
    scale: torch.Tensor
    shift: Optional[torch.Tensor] = None


def _uniform_codes(x: torch.Tensor, bits: int, mode: str, clip: Optional[float]) -> ShiftedCodes:
    """:func:`ds_kdqat.deploy.int_ops.uniform_codes` with the zero point 128 added in float (exact) and one cast
    to uint8, instead of ``int8`` then ``+ 128`` (two passes fewer over the activation)."""
    codes, scale, shift = uniform_codes(x, bits, mode, clip, ACTIVATION_ZERO_POINT)
    return ShiftedCodes(codes.to(torch.uint8), scale, shift)


def _lsq_codes(x: torch.Tensor, bits: int, step: torch.Tensor) -> ShiftedCodes:
    """:func:`ds_kdqat.deploy.int_ops.lsq_codes`, shifted to uint8."""
    codes, scale, _ = lsq_codes(x, bits, step, ACTIVATION_ZERO_POINT)
    return ShiftedCodes(codes.to(torch.uint8), scale)


SHIFTED_ENCODERS = {"uniform": _uniform_codes, "lsq": _lsq_codes}
"""Activation method → encoder to :class:`ShiftedCodes`; the same codes as ``int_ops.ACTIVATION_ENCODERS``
(plus 128), checked by the tests."""


def encode_shifted(quantizer: nn.Module, x: torch.Tensor) -> ShiftedCodes:
    """``x`` (M, K) → its codes by ``quantizer``'s rule as :class:`ShiftedCodes` (the int8 backend's
    ``Q_x`` + 128)."""
    if quantizer.method not in SHIFTED_ENCODERS:
        raise ConfigError("onnx", f"activation method {quantizer.method!r} has no ONNX encoder; known: "
                          f"{sorted(SHIFTED_ENCODERS)}")
    if quantizer.method == "lsq":
        return _lsq_codes(x, quantizer.bits, quantizer.quantizer.step(quantizer).detach())
    return _uniform_codes(x, quantizer.bits, quantizer.mode, quantizer.clip)


class _MatMulInteger(torch.autograd.Function):
    """``(a − a_zp)·(b − b_zp)``: ``a`` (M, K) uint8, ``a_zp`` () uint8, ``b`` (K, N) int8 (``b_zp`` None) or
    uint8 (``b_zp`` () uint8) → (M, N) int32, exact. Runs :func:`int8_matmul` on the int8 codes; exported as
    ONNX ``MatMulInteger(a, b, a_zp[, b_zp])``."""

    @staticmethod
    def forward(ctx, a, b, a_zp, b_zp):  # type: ignore[override]
        a8 = (a.to(torch.int16) - a_zp.to(torch.int16)).to(torch.int8)
        b8 = b if b_zp is None else (b.to(torch.int16) - b_zp.to(torch.int16)).to(torch.int8)
        return int8_matmul(a8, b8)

    @staticmethod
    def symbolic(g, a, b, a_zp, b_zp):  # the TorchScript exporter's hook
        return g.op("MatMulInteger", *([a, b, a_zp] if b_zp is None else [a, b, a_zp, b_zp]))


class OnnxIntLinear(nn.Module):
    """The traceable twin of an :class:`IntLinear` (same codes and scales, same values): (…, K) → (…, N).

    Its forward computes what :func:`ds_kdqat.deploy.int_ops.int_linear` computes, with ops that have ONNX
    forms: ``Q_x + 128`` by :func:`encode_shifted` (the quantizer's rule), ``acc = MatMulInteger(Q_x + 128,
    Q_wᵀ, 128)`` (M, N) int32 (see :data:`ACTIVATION_ZERO_POINT`, :data:`SIGNED_WEIGHT_LIMIT`),
    ``y = float(acc)·(a_x·a_w) + c`` with ``c = a_w·Σ_k Q_w·b_x + bias`` (N,), and for min-max weights (``b_w``
    set) ``+ (a_x·b_w)·Σ_k Q_x[m]`` and ``c += K·b_x·b_w``. ``memo``: a dict shared by the linears of one
    model, in which a shared quantizer (Q, K, V) keeps the codes of its last input, so the graph encodes that
    input once.
    """

    def __init__(self, linear: IntLinear, memo: dict):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        codes_t = linear.weight_codes.t().contiguous()  # (K, N) int8
        wide = bool(codes_t.numel()) and int(codes_t.to(torch.int16).abs().max()) > SIGNED_WEIGHT_LIMIT
        self.register_buffer("weight_codes_t", _shift_to_uint8(codes_t) if wide else codes_t, persistent=False)
        self.register_buffer("weight_zero_point", torch.tensor(ACTIVATION_ZERO_POINT, dtype=torch.uint8)
                             if wide else None, persistent=False)
        self.register_buffer("act_zero_point", torch.tensor(ACTIVATION_ZERO_POINT, dtype=torch.uint8),
                             persistent=False)
        self.register_buffer("weight_scale", linear.weight_scale, persistent=False)
        self.register_buffer("weight_shift", linear.weight_shift, persistent=False)
        self.register_buffer("code_sums", linear.code_sums, persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach(), persistent=False)
        self.act_quant = linear.act_quant
        self._memo = memo
        has_int8_gemm()  # probe the GEMM kernel now, not inside a trace

    @property
    def weight(self) -> torch.Tensor:
        """An int8 tensor of the weight's shape (out, in) on the ``meta`` device, for model code that reads a
        linear's ``weight`` for its dtype (HF's T5 FFN leaves its input in its own dtype for an int8 weight, as
        for :class:`IntLinear`); it holds no values, so no trace records them."""
        return torch.empty((self.out_features, self.in_features), dtype=torch.int8, device="meta")

    def _encoded(self, x: torch.Tensor) -> ShiftedCodes:
        """``x``'s codes as (tokens, K); a shared quantizer encodes its input once (the memo)."""
        if not self.act_quant.shared:
            return encode_shifted(self.act_quant, x.reshape(-1, self.in_features))
        key = id(self.act_quant)
        held = self._memo.get(key)
        if held is not None and held[0] is x:
            return held[1]
        encoded = encode_shifted(self.act_quant, x.reshape(-1, self.in_features))
        self._memo[key] = (x, encoded)
        return encoded

    def _epilogue(self, x: ShiftedCodes, acc: torch.Tensor) -> torch.Tensor:
        """``int_linear``'s float part: (M, N) int32 → (M, N) float32."""
        w_scale, w_shift = self.weight_scale, self.weight_shift
        out = acc.float() * (x.scale * w_scale)
        constant = w_scale * self.code_sums * x.shift if x.shift is not None else None
        if w_shift is not None:
            row_sums = (x.codes.to(torch.int32).sum(dim=1) - ACTIVATION_ZERO_POINT * self.in_features).float()
            out = out + row_sums.unsqueeze(1) * (x.scale * w_shift * torch.ones_like(self.code_sums)).unsqueeze(0)
            if x.shift is not None:
                constant = constant + self.in_features * x.shift * w_shift
        if self.bias is not None:
            constant = self.bias if constant is None else constant + self.bias
        return out if constant is None else out + constant

    def _weight(self) -> torch.Tensor:
        codes = self.weight_codes_t.t()
        if self.weight_zero_point is not None:
            codes = (codes.to(torch.int16) - ACTIVATION_ZERO_POINT).to(torch.int8)
        return IntTensor(codes, self.weight_scale, self.weight_shift).dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.act_quant is None:  # weight-only quantization: decoded weight, float GEMM (as IntLinear)
            out = F.linear(flat.float(), self._weight(), self.bias)
        else:
            encoded = self._encoded(x)
            acc = _MatMulInteger.apply(encoded.codes, self.weight_codes_t, self.act_zero_point,
                                       self.weight_zero_point)
            out = self._epilogue(encoded, acc)
        return out.to(x.dtype).reshape(x.shape[:-1] + (self.out_features,))


def traceable_integer_model(model: nn.Module) -> int:
    """Replace every :class:`IntLinear` of ``model`` (an int8-backend student) by its :class:`OnnxIntLinear`
    twin, in place; return how many."""
    memo: dict = {}
    names = [name for name, module in model.named_modules() if isinstance(module, IntLinear)]
    for name in names:
        replace_module(model, name, OnnxIntLinear(model.get_submodule(name), memo))
    return len(names)


# --------------------------------------------------------------------------------------------------------------
# inputs and outputs


def onnx_io_names(manifest: dict, model: Optional[nn.Module] = None) -> tuple[list[str], list[str]]:
    """The graph's input and output names for an export's ``task`` entry: text ``input_ids``,
    ``attention_mask`` (+ ``token_type_ids`` when the task uses them and ``model``'s forward takes them), images
    ``pixel_values``; outputs ``logits``, or ``start_logits``, ``end_logits`` for QA."""
    task = manifest["task"]
    if task["input_kind"] == "pixels":
        inputs = ["pixel_values"]
    else:
        inputs = ["input_ids", "attention_mask"] + (["token_type_ids"] if task.get("token_type_ids") else [])
    if model is not None:
        accepted = inspect.signature(model.forward).parameters
        inputs = [name for name in inputs if name in accepted]
    outputs = ["start_logits", "end_logits"] if task["kind"] == "qa" else ["logits"]
    return inputs, outputs


class _Graph(nn.Module):
    """The HF model as a function of positional tensors (named by ``inputs``) returning a tuple (``outputs``)."""

    def __init__(self, model: nn.Module, inputs: list[str], outputs: list[str]):
        super().__init__()
        self.model, self.inputs, self.outputs = model, inputs, outputs

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        result = self.model(**dict(zip(self.inputs, tensors)), return_dict=True)
        return tuple(result[name] for name in self.outputs)


def example_inputs(config: Any, inputs: list[str], batch: int = 2, length: int = 8) -> tuple[torch.Tensor, ...]:
    """Tracing inputs: ids (batch, length) int64 whose rows after the first are half padding (so the traced
    graph builds the padding mask: HF skips it for an all-ones mask); pixels (batch, C, H, W) float32."""
    tensors = []
    for name in inputs:
        if name == "pixel_values":
            size = config.image_size
            height, width = (size, size) if isinstance(size, int) else tuple(size)
            tensors.append(torch.randn(batch, config.num_channels, height, width))
        elif name == "input_ids":
            tensors.append(torch.randint(1, max(2, config.vocab_size), (batch, length)))
        elif name == "attention_mask":
            mask = torch.ones(batch, length, dtype=torch.long)
            mask[1:, length // 2:] = 0
            tensors.append(mask)
        else:  # token_type_ids
            types = torch.zeros(batch, length, dtype=torch.long)
            types[:, length // 2:] = 1 if getattr(config, "type_vocab_size", 1) > 1 else 0
            tensors.append(types)
    return tuple(tensors)


def dynamic_axes(inputs: list[str], outputs: list[str]) -> dict[str, dict[int, str]]:
    """Batch (and sequence, for text inputs and per-token QA outputs) axes left free."""
    axes = {}
    for name in inputs + outputs:
        axes[name] = {0: "batch"} if name in ("pixel_values", "logits") else {0: "batch", 1: "sequence"}
    return axes


# --------------------------------------------------------------------------------------------------------------
# the export


def _check_family(manifest: dict, source: str) -> None:
    family = manifest["model"].get("family")
    if family not in ONNX_FAMILIES:
        raise ConfigError("onnx", f"{source}: ONNX export supports the families {list(ONNX_FAMILIES)}; this "
                          f"export is {family!r} ({manifest['model']['architecture']}); use the 'int8' or "
                          "'fakequant' backend for it")


def _load_integer(folder: Path) -> tuple[nn.Module, dict]:
    """The export's int8-backend model and its manifest, every listed file checked but ``model.onnx`` (which
    the export replaces: a damaged old one is no error)."""
    from ds_kdqat.deploy.artifact import read_export
    from ds_kdqat.deploy.load import build_skeleton
    from ds_kdqat.quant.export import load_packed, verify_files

    manifest = read_export(folder)
    _check_family(manifest, str(folder / MANIFEST_FILE))
    others = {name: entry for name, entry in manifest.get("files", {}).items() if name != ONNX_FILE}
    verify_files(folder, {"files": others})
    model = build_skeleton(folder, manifest["model"]["architecture"])
    return load_packed(folder, model, frozen=True, integer=True, verify=False).eval(), manifest


def _write_manifest(folder: Path, manifest: dict) -> None:
    atomic_write_text(folder / MANIFEST_FILE, json.dumps(manifest, indent=1))


def _without_onnx(manifest: dict) -> dict:
    manifest = dict(manifest)
    manifest["files"] = {k: v for k, v in manifest.get("files", {}).items() if k != ONNX_FILE}
    manifest.pop("onnx", None)
    return manifest


def _with_onnx(folder: Path, manifest: dict, opset: int, inputs: list[str], outputs: list[str]) -> dict:
    """``manifest`` plus ``model.onnx``'s ``files`` entry (size, SHA-256) and the ``onnx`` entry."""
    path = folder / ONNX_FILE
    manifest = _without_onnx(manifest)
    manifest["files"][ONNX_FILE] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    manifest["onnx"] = {"file": ONNX_FILE, "opset": opset, "inputs": inputs, "outputs": outputs}
    return manifest


def _write_graph(graph: nn.Module, example: tuple, path: Path, inputs: list[str], outputs: list[str],
                 opset: int) -> None:
    def write(tmp: str) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            # TracerWarnings: HF's Python-side shape checks, constant for every input shape
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, example, tmp, dynamo=False, opset_version=opset, input_names=inputs,
                              output_names=outputs, dynamic_axes=dynamic_axes(inputs, outputs),
                              do_constant_folding=True)

    atomic_write_via(path, write)


def export_onnx(folder: Union[str, os.PathLike], *, opset: int = DEFAULT_OPSET,
                batch: int = 2, sequence: int = 8) -> Path:
    """Write ``<folder>/model.onnx`` for the export at ``folder`` and record it in its manifest; return its path.

    The graph computes the int8 backend's forward (see the module docstring); its batch (and, for text,
    sequence) axes are dynamic. ``batch`` (≥ 2) × ``sequence``: the example shape traced. Order of writes, so
    that an interrupted export leaves a loadable folder: the manifest without any old ONNX entry, then the
    graph (atomically), then the manifest with the new entry. Raises :class:`~ds_kdqat.errors.DataError` for
    a damaged export, :class:`~ds_kdqat.errors.ConfigError` for a family without ONNX support
    (:data:`ONNX_FAMILIES`) or a bad argument, and :class:`~ds_kdqat.deploy.onnx_backend.DeployExtraMissing`
    (an ImportError) when the ``onnx`` package is not installed.
    """
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ConfigError("opset", f"got {opset}, expected {MIN_OPSET}..{MAX_OPSET}")
    if batch < 2 or sequence < 2:
        raise ConfigError("batch", f"the traced example needs batch >= 2 and sequence >= 2 (a padded row), "
                          f"got {batch} x {sequence}")
    import_deploy_package("onnx", "ONNX export")
    path = Path(folder)
    model, manifest = _load_integer(path)
    count = traceable_integer_model(model)
    inputs, outputs = onnx_io_names(manifest, model)
    graph = _Graph(model, inputs, outputs).eval()
    _write_manifest(path, _without_onnx(manifest))
    _write_graph(graph, example_inputs(model.config, inputs, batch, sequence), path / ONNX_FILE, inputs, outputs,
                 opset)
    _write_manifest(path, _with_onnx(path, manifest, opset, inputs, outputs))
    logger.info("wrote %s (%d integer linears, opset %d)", path / ONNX_FILE, count, opset)
    return path / ONNX_FILE
