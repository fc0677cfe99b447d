"""ONNX export of a self-contained student export, with the linears as real integer ops.

:func:`export_onnx` loads the export with the ``"int8"`` backend (:mod:`ds_kdqat.deploy.int_modules`) and
writes ``<folder>/model.onnx``, then adds it to the manifest (``files`` and an ``"onnx"`` entry), so
``load_student(folder, "onnx")`` (:mod:`ds_kdqat.deploy.onnx_backend`) runs it with ONNX Runtime.

Each :class:`~ds_kdqat.deploy.int_modules.IntLinear` becomes, for its input ``x`` (tokens, K):

* the activation encoding, with the operations of :func:`ds_kdqat.deploy.int_ops._uniform_activation` /
  ``_lsq_activation`` in their order (the encoder functions themselves are traced), so the int8 codes
  ``Q_x`` are the PyTorch backend's: min-max ``ReduceMin, ReduceMax → Sub → Div → Round → Sub → Cast(int8)``,
  symmetric ``Abs → ReduceMax → Clip → Div → Clip → Mul → Round → Cast(int8)``, LSQ
  ``Div → Clip → Round → Cast(int8)`` (with ``Clip`` first when the quantizer clips); Q, K and V share their
  input and encode it once;
* ``MatMulInteger(Q_x, Q_wᵀ)`` (int8 × int8 → int32; ``Q_wᵀ`` a (K, N) int8 initializer);
* the float epilogue of :func:`ds_kdqat.deploy.int_ops.int_linear`:
  ``y = float(acc)·(a_x·a_w) + (a_w·Σ_k Q_w·b_x + bias)``, plus ``a_x·b_w·Σ_k Q_x + K·b_x·b_w`` for min-max
  weights.

Everything else (embeddings, LayerNorm, GELU, softmax, the attention quantizers, which stay fake-quant,
the float pooler/classifier) is traced as ordinary float ops. The graph is written by the TorchScript exporter
(``torch.onnx.export(..., dynamo=False)``): the integer product is a :class:`torch.autograd.Function` whose
``symbolic`` emits ``MatMulInteger``; the rest of each integer linear traces as it runs.

Supported families (:data:`ONNX_FAMILIES`): ``bert`` (BERT, RoBERTa, ELECTRA), ``distilbert`` and ``vit``; task
heads: sequence classification / regression, extractive QA (text families) and image classification (ViT).
Inputs are named as the HF forward's arguments (``input_ids``, ``attention_mask``, ``token_type_ids`` when the
export's task uses them; ``pixel_values`` for images) with dynamic batch (and sequence) axes; outputs
``logits``, or ``start_logits``/``end_logits`` for QA.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ds_kdqat.deploy.int_modules import IntLinear, encode_activation, replace_module
from ds_kdqat.deploy.int_ops import IntTensor, int8_matmul
from ds_kdqat.errors import ConfigError, DataError
from ds_kdqat.fileio import atomic_write_text, atomic_write_via, sha256_file

ONNX_FILE = "model.onnx"
DEFAULT_OPSET = 17
MIN_OPSET = 14  # Trilu-free, but the TorchScript symbolics of HF's masking need ≥ 14

ONNX_FAMILIES = ("bert", "distilbert", "vit")
"""Families whose export traces to ONNX (see the module docstring); others raise :class:`ConfigError`."""


# --------------------------------------------------------------------------------------------------------------
# the integer product and the traceable integer linear


class _MatMulInteger(torch.autograd.Function):
    """``a`` (M, K) int8 · ``b`` (K, N) int8 → (M, N) int32: :func:`int8_matmul` when run, ONNX
    ``MatMulInteger`` when traced for export."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return int8_matmul(a, b)

    @staticmethod
    def symbolic(g, a, b):  # noqa: D401 - the TorchScript exporter's hook
        return g.op("MatMulInteger", a, b)


class OnnxIntLinear(nn.Module):
    """The traceable twin of an :class:`IntLinear` (same buffers, same values): (…, K) → (…, N).

    Its forward computes what :func:`ds_kdqat.deploy.int_ops.int_linear` computes, written with ops that have
    ONNX forms: ``acc = MatMulInteger(Q_x, Q_wᵀ)`` (M, N) int32, ``y = float(acc)·(a_x·a_w) + c`` with
    ``c = a_w·Σ_k Q_w·b_x + bias`` (N,), and for min-max weights (``b_w`` set) ``+ (a_x·b_w)·Σ_k Q_x[m]`` and
    ``c += K·b_x·b_w``. ``memo``: a dict shared by the linears of one model, where a shared quantizer (Q, K, V)
    keeps the codes of its last input so the graph encodes that input once.
    """

    def __init__(self, linear: IntLinear, memo: dict):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_codes_t", linear.weight_codes.t().contiguous(), persistent=False)  # (K, N)
        self.register_buffer("weight_scale", linear.weight_scale, persistent=False)
        self.register_buffer("weight_shift", linear.weight_shift, persistent=False)
        self.register_buffer("code_sums", linear.code_sums, persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach(), persistent=False)
        self.act_quant = linear.act_quant
        self._memo = memo

    def _encoded(self, x: torch.Tensor) -> IntTensor:
        quantizer = self.act_quant
        if not quantizer.shared:
            return encode_activation(quantizer, x.reshape(-1, self.in_features))
        key = id(quantizer)
        held = self._memo.get(key)
        if held is not None and held[0] is x and held[1] == x._version:
            return held[2]
        encoded = encode_activation(quantizer, x.reshape(-1, self.in_features))
        self._memo[key] = (x, x._version, encoded)
        return encoded

    def _epilogue(self, x: IntTensor, acc: torch.Tensor) -> torch.Tensor:
        w_scale, w_shift = self.weight_scale, self.weight_shift
        out = acc.float() * (x.scale * w_scale)
        constant = w_scale * self.code_sums * x.shift if x.shift is not None else None
        if w_shift is not None:
            row_sums = x.codes.to(torch.int32).sum(dim=1).float()  # (M,)
            out = out + row_sums.unsqueeze(1) * (x.scale * w_shift * torch.ones_like(self.code_sums)).unsqueeze(0)
            if x.shift is not None:
                constant = constant + self.in_features * x.shift * w_shift
        if self.bias is not None:
            constant = self.bias if constant is None else constant + self.bias
        return out if constant is None else out + constant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.act_quant is None:  # weight-only quantization: decoded weight, float GEMM (as IntLinear)
            weight = IntTensor(self.weight_codes_t.t(), self.weight_scale, self.weight_shift).dequantize()
            out = F.linear(flat.float(), weight, self.bias)
        else:
            encoded = self._encoded(x)
            out = self._epilogue(encoded, _MatMulInteger.apply(encoded.codes, self.weight_codes_t))
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


def onnx_io_names(manifest: dict) -> tuple[list[str], list[str]]:
    """The graph's input and output names for an export's ``task`` entry: text ``input_ids``,
    ``attention_mask`` (+ ``token_type_ids`` when the task uses them), images ``pixel_values``; outputs
    ``logits``, or ``start_logits``, ``end_logits`` for QA."""
    task = manifest["task"]
    if task["input_kind"] == "pixels":
        inputs = ["pixel_values"]
    else:
        inputs = ["input_ids", "attention_mask"] + (["token_type_ids"] if task.get("token_type_ids") else [])
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


def example_inputs(model: nn.Module, inputs: list[str], batch: int = 2, length: int = 8) -> tuple[torch.Tensor, ...]:
    """Tracing inputs: ids (batch, length) int64 with the second row padded; pixels (batch, C, H, W) float32."""
    config = model.config
    tensors = []
    for name in inputs:
        if name == "pixel_values":
            size = config.image_size
            tensors.append(torch.randn(batch, config.num_channels, size, size))
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


def _write_graph(graph: nn.Module, example: tuple, path: Path, inputs: list[str], outputs: list[str],
                 opset: int) -> None:
    def write(tmp: str) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about Python-side shape checks of HF's code
            torch.onnx.export(graph, example, tmp, dynamo=False, opset_version=opset, input_names=inputs,
                              output_names=outputs, dynamic_axes=dynamic_axes(inputs, outputs),
                              do_constant_folding=True)

    atomic_write_via(path, write)


def _record(folder: Path, manifest: dict, opset: int, inputs: list[str], outputs: list[str]) -> dict:
    """The manifest with ``model.onnx``'s ``files`` entry and the ``onnx`` entry, written atomically."""
    path = folder / ONNX_FILE
    manifest = dict(manifest)
    manifest["files"] = dict(manifest.get("files", {}))
    manifest["files"][ONNX_FILE] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    manifest["onnx"] = {"file": ONNX_FILE, "opset": opset, "inputs": inputs, "outputs": outputs}
    atomic_write_text(folder / "manifest.json", json.dumps(manifest, indent=1))
    return manifest


def export_onnx(folder: Union[str, os.PathLike], *, opset: int = DEFAULT_OPSET,
                batch: int = 2, sequence: int = 8) -> Path:
    """Write ``<folder>/model.onnx`` for the export at ``folder`` and record it in its manifest; return its path.

    The graph computes the int8 backend's forward (see the module docstring). ``batch``/``sequence``: the
    shape traced (any shape runs: batch and sequence are dynamic axes). Raises
    :class:`~ds_kdqat.errors.DataError` for a damaged export and :class:`~ds_kdqat.errors.ConfigError` for a
    family the export does not support.
    """
    from ds_kdqat.deploy.load import load_student

    if not MIN_OPSET <= opset <= 21:
        raise ConfigError("opset", f"got {opset}, expected {MIN_OPSET}..21")
    path = Path(folder)
    model = load_student(path, "int8")
    manifest = model.kdqat_export.manifest
    _check_family(manifest, str(path / "manifest.json"))
    traceable_integer_model(model)
    inputs, outputs = onnx_io_names(manifest)
    graph = _Graph(model, inputs, outputs).eval()
    _write_graph(graph, example_inputs(model, inputs, batch, sequence), path / ONNX_FILE, inputs, outputs, opset)
    _record(path, manifest, opset, inputs, outputs)
    return path / ONNX_FILE
