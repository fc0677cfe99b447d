"""Opt-in compiled element-wise kernels of the integer backend (``torch.compile``, inductor).

The integer backend's element-wise work (encoding a linear's input to integer codes, fake-quantizing the
attention matmuls' inputs) is a min/max pass and five or six more passes in eager PyTorch; compiled, each is one
reduction and one fused pass. The functions here are those of :mod:`ds_kdqat.deploy.int_ops` written unblocked
(the same statistics and per element the same float operations in the same order, so the same codes and values),
compiled with dynamic shapes: batch and sequence length may change without recompiling (size-1 dimensions are
specialised by ``torch.compile``: batch 1 compiles once more).

:class:`CompiledKernels` compiles lazily, on the first call of each kernel (seconds per kernel and input rank
on a 2-core CPU; a C++ compiler is needed). Should compiling or running a compiled kernel fail, it warns once
and runs the eager kernels from then on. Float32 inputs only (others take the eager kernels).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch

from ds_kdqat.deploy.int_ops import (
    CODE_DTYPES,
    IntTensor,
    encode_lsq,
    encode_uniform,
    fake_lsq,
    fake_uniform,
)

logger = logging.getLogger(__name__)

_FLOAT32 = torch.finfo(torch.float32)


def _uniform_codes(x: torch.Tensor, bits: int, mode: str, clip: Optional[float], zero_point: int):
    """:func:`~ds_kdqat.deploy.int_ops.encode_uniform` in one piece: ``(codes, scale, shift)``."""
    if clip is not None:
        x = x.clamp(-clip, clip)
    lo, hi = torch.aminmax(x)
    dtype = CODE_DTYPES[zero_point]
    if mode == "symmetric":
        qmax = 2 ** (bits - 1) - 1
        scale = (qmax / torch.maximum(lo.abs(), hi.abs()).clamp_min(_FLOAT32.tiny)).clamp_max(_FLOAT32.max)
        rounded = torch.mul(x, scale).round()
        return (rounded + zero_point if zero_point else rounded).to(dtype), 1.0 / scale, None
    half = 2 ** (bits - 1)
    step = ((hi - lo) / (2 ** bits - 1)).clamp_min(_FLOAT32.tiny)
    rounded = torch.sub(x, lo).div(step).round()  # c ∈ [0, 2^b − 1]; the code is c − 2^(b−1) + zero_point
    return (rounded + (zero_point - half)).to(dtype), step, lo + half * step


def _lsq_codes(x: torch.Tensor, bits: int, step: torch.Tensor, zero_point: int) -> torch.Tensor:
    """:func:`~ds_kdqat.deploy.int_ops.encode_lsq`'s codes in one piece."""
    rounded = torch.div(x, step).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1).round()
    return (rounded + zero_point if zero_point else rounded).to(CODE_DTYPES[zero_point])


def _fake_uniform(x: torch.Tensor, bits: int, mode: str, clip: Optional[float]) -> torch.Tensor:
    """:func:`~ds_kdqat.deploy.int_ops.fake_uniform` in one piece (contiguous output)."""
    x = x.contiguous()
    if clip is not None:
        x = x.clamp(-clip, clip)
    lo, hi = torch.aminmax(x)
    if mode == "symmetric":
        qmax = 2 ** (bits - 1) - 1
        scale = (qmax / torch.maximum(lo.abs(), hi.abs()).clamp_min(_FLOAT32.tiny)).clamp_max(_FLOAT32.max)
        return torch.mul(x, scale).round().div(scale)
    step = ((hi - lo) / (2 ** bits - 1)).clamp_min(_FLOAT32.tiny)
    return torch.sub(x, lo).div(step).round().mul(step).add(lo)


def _fake_lsq(x: torch.Tensor, bits: int, step: torch.Tensor) -> torch.Tensor:
    """:func:`~ds_kdqat.deploy.int_ops.fake_lsq` in one piece (contiguous output)."""
    return torch.div(x.contiguous(), step).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1).round().mul(step)


class CompiledKernels:
    """The integer backend's element-wise kernels, compiled on first use; eager after a failure (one warning).

    ``encode(quantizer, x, zero_point)``: a linear's input ``x`` (M, K) → :class:`IntTensor` (what
    :func:`~ds_kdqat.deploy.int_modules.encode_activation` gives); ``fake(quantizer, x)``: an attention matmul's
    input → its fake-quantized values, contiguous (what :class:`~ds_kdqat.deploy.int_modules.
    IntAttentionQuantizer` gives). A copy or pickle is a new instance (compiled code is not copied).
    """

    def __init__(self):
        self._kernels: dict[str, Callable[..., Any]] = {}
        self.failed: Optional[str] = None

    def _kernel(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        kernel = self._kernels.get(name)
        if kernel is None:
            kernel = self._kernels[name] = torch.compile(fn, dynamic=True, fullgraph=True)
        return kernel

    def _run(self, name: str, fn: Callable[..., Any], eager: Callable[[], Any], *args) -> Any:
        if self.failed is None:
            try:
                return self._kernel(name, fn)(*args)
            except Exception as error:  # a missing compiler, an unsupported platform: any failure of inductor
                self.failed = f"{type(error).__name__}: {error}"
                logger.warning("compiled integer kernels failed, running eager from now on (%s)",
                               self.failed.splitlines()[0][:300])
        return eager()

    def encode(self, quantizer: Any, x: torch.Tensor, zero_point: int) -> IntTensor:
        bits = quantizer.bits
        if quantizer.method == "lsq":
            step = quantizer.quantizer.step(quantizer).detach().reshape(())
            if x.dtype != torch.float32:
                return encode_lsq(x, bits, step, zero_point)
            codes = self._run("lsq_codes", _lsq_codes, lambda: encode_lsq(x, bits, step, zero_point).codes,
                              x, bits, step, zero_point)
            return IntTensor(codes, step, None, zero_point)
        mode, clip = quantizer.mode, quantizer.clip
        if x.dtype != torch.float32:
            return encode_uniform(x, bits, mode, clip, zero_point)
        eager = lambda: encode_uniform(x, bits, mode, clip, zero_point)  # noqa: E731
        result = self._run("uniform_codes", _uniform_codes, eager, x, bits, mode, clip, zero_point)
        return result if isinstance(result, IntTensor) else IntTensor(*result, zero_point)

    def fake(self, quantizer: Any, x: torch.Tensor) -> torch.Tensor:
        bits = quantizer.bits
        if quantizer.method == "lsq":
            step = quantizer.quantizer.step(quantizer).detach().reshape(()).to(x.dtype)
            if x.dtype != torch.float32:
                return fake_lsq(x, bits, step)
            return self._run("fake_lsq", _fake_lsq, lambda: fake_lsq(x, bits, step), x, bits, step)
        mode, clip = quantizer.mode, quantizer.clip
        if x.dtype != torch.float32:
            return fake_uniform(x, bits, mode, clip)
        return self._run("fake_uniform", _fake_uniform, lambda: fake_uniform(x, bits, mode, clip), x, bits, mode, clip)

    def __reduce__(self):
        return (CompiledKernels, ())


_SHARED: Optional[CompiledKernels] = None


def compiled_kernels() -> CompiledKernels:
    """The process's one :class:`CompiledKernels` (compiled code is shared by every model that uses it)."""
    global _SHARED
    if _SHARED is None:
        _SHARED = CompiledKernels()
    return _SHARED
