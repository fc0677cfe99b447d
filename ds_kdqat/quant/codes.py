"""Fake-quantized tensors saved for the backward as their integer codes.

A quantized linear saves its fake-quantized input ``x̂`` and weight ``ŵ`` for the backward (``ŵ`` for
``∂L/∂x``, ``x̂`` for ``∂L/∂W``), and the attention's matmuls save ``q̂``, ``k̂``, the quantized map and ``v̂``.
Each is a float tensor, yet holds at most ``2^b`` distinct values: ``x̂ = codes·scale (+ offset)`` or
``x̂ = codes / scale``. :class:`Codes` keeps those codes in the narrowest integer type (int8/uint8 for 8-bit
activations and ternary weights: a quarter of fp32) and :func:`saved_as_codes` makes autograd save them in
place of the float tensor (``torch.autograd.graph.saved_tensors_hooks``); the backward rebuilds the float
tensor with the forward's own arithmetic (same operations in the same order), so it is bit for bit the tensor
the forward used, and gradients are unchanged. The float copy lives only while the forward op runs, and
again while its backward runs.

Matching is by storage: autograd often saves a view of the tensor (a reshape for the batched matmul, ``ŵᵀ``
for the linear), so a saved tensor whose storage is the registered tensor's is rebuilt from the codes and
viewed with the saved tensor's size, strides and offset. Anything else the op saves is kept as it is.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)


def code_dtype(low: int, high: int) -> torch.dtype:
    """The narrowest integer dtype holding every integer in ``[low, high]``."""
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return dtype
    return torch.int64


@dataclass(frozen=True)
class Codes:
    """``x̂`` as integer codes: ``codes·scale`` (``offset`` None, ``divide`` False), ``codes·scale + offset``
    (min-max) or ``codes / scale`` (``divide``; symmetric uniform), computed in ``scale``'s dtype and cast to
    ``dtype`` (the fake-quantized tensor's).

    ``codes`` has ``x̂``'s shape and memory layout (so storage position ``p`` of one is position ``p`` of the
    other); ``scale``/``offset`` broadcast against it (``()`` or one per row).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    offset: Optional[torch.Tensor] = None
    divide: bool = False
    dtype: torch.dtype = torch.float32
    factor: Optional["Codes"] = None  # the tensor is these values times factor's (dropout of a quantized tensor)

    def values(self) -> torch.Tensor:
        """The fake-quantized tensor, rebuilt: same values, shape and strides as the forward's."""
        if self.divide:
            out = torch.div(self.codes, self.scale)
        else:
            out = torch.mul(self.codes, self.scale)
            if self.offset is not None:
                out.add_(self.offset)
        out = out if out.dtype == self.dtype else out.to(self.dtype)
        return out if self.factor is None else out.mul_(self.factor.values())

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + (self.factor.nbytes if self.factor else 0)


def dropout_with_codes(x: torch.Tensor, codes: Codes, p: float) -> torch.Tensor:
    """Dropout of the fake-quantized ``x`` in training, saved for the backward as codes.

    ``x · (keep / (1 − p))`` with ``keep ~ Bernoulli(1 − p)``: PyTorch's own CPU dropout (the same random draws
    from the same generator, the same products, so the same tensor). The mask is saved by the product as its
    0/1 bytes, and a consumer's :func:`saved_as_codes` with :func:`dropped_codes` saves the result as
    ``x``'s codes times the mask. Returns ``(dropped, its codes)``.
    """
    keep = torch.empty_like(x, dtype=torch.uint8).bernoulli_(1 - p)
    noise_codes = Codes(keep, torch.ones((), dtype=x.dtype, device=x.device).div_(1 - p), dtype=x.dtype)
    noise = noise_codes.values()
    with saved_as_codes((noise, noise_codes)):
        dropped = x * noise
    return dropped, Codes(codes.codes, codes.scale, codes.offset, codes.divide, codes.dtype, factor=noise_codes)


def owns_storage(t: torch.Tensor) -> bool:
    """Whether ``t`` covers its whole storage from offset 0 densely (each storage element once), so that a
    tensor of ``t``'s layout maps storage positions one to one."""
    if t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        return False
    expected = 1  # dense and non-overlapping: the strides, sorted, are those of a contiguous permutation
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


@dataclass(frozen=True)
class _Saved:
    codes: Codes
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


class _CodeSaver:
    """The pack hook. Autograd keeps the hooks with every tensor saved under them, so this holds no float
    tensor (only storage addresses, which cannot be reused while the block runs: the caller holds the tensors)."""

    def __init__(self, pairs: list[tuple[torch.Tensor, Codes]]):
        self.by_storage = {t.untyped_storage().data_ptr(): (t.dtype, t.device, codes) for t, codes in pairs}

    def pack(self, t: torch.Tensor):
        entry = self.by_storage.get(t.untyped_storage().data_ptr()) if t.layout == torch.strided else None
        if entry is None or entry[0] != t.dtype or entry[1] != t.device:
            return t
        return _Saved(entry[2], t.size(), t.stride(), t.storage_offset())

    @staticmethod
    def unpack(saved):
        if not isinstance(saved, _Saved):
            return saved
        trace = _TRACE.get()
        if trace is None:
            base = saved.codes.values()
        else:  # one rebuilt tensor per codes object, whose storage the trace counts at the codes' size
            key = id(saved.codes)
            if key not in trace:
                trace[key] = (saved.codes, saved.codes.values())
            base = trace[key][1]
        return base.as_strided(saved.size, saved.stride, saved.offset)


_TRACE: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("kdqat_codes_trace", default=None)


@contextlib.contextmanager
def tracing_saved_codes() -> Iterator[dict]:
    """For a memory trace that reads a graph's saved tensors back (``node._saved_*``): within the block a tensor
    kept as codes is rebuilt once per codes object, and :func:`kept_bytes` gives the bytes autograd really keeps
    for a storage (the codes', for a rebuilt one)."""
    trace: dict = {}
    token = _TRACE.set(trace)
    try:
        yield trace
    finally:
        _TRACE.reset(token)


def kept_bytes(storage: torch.UntypedStorage) -> int:
    """Bytes autograd keeps for ``storage``: its size, or, for a tensor rebuilt from codes inside
    :func:`tracing_saved_codes`, the codes' size."""
    trace = _TRACE.get()
    if trace:
        for codes, rebuilt in trace.values():
            if rebuilt.untyped_storage().data_ptr() == storage.data_ptr():
                return codes.nbytes
    return storage.nbytes()


_SAVE_CODES: contextvars.ContextVar[bool] = contextvars.ContextVar("kdqat_save_codes", default=True)


@contextlib.contextmanager
def fp32_saves() -> Iterator[None]:
    """Within the block, fake-quantized tensors are saved for the backward as they are (float), not as codes:
    the reference the codes are checked against (same values, so the same losses and gradients)."""
    token = _SAVE_CODES.set(False)
    try:
        yield
    finally:
        _SAVE_CODES.reset(token)


@contextlib.contextmanager
def saved_as_codes(*pairs: tuple[torch.Tensor, Optional[Codes]]) -> Iterator[None]:
    """Within the block, autograd saves each fake-quantized tensor of ``pairs`` (``(x̂, codes of x̂)``; pairs
    whose codes are None, or whose tensor does not own its storage, are left out) as its codes.

    Use it around the ops that consume the tensors (a linear, a matmul); it does nothing when no graph is
    being recorded, or inside :func:`fp32_saves`.
    """
    kept = [(t, c) for t, c in pairs if c is not None and owns_storage(t)]
    if not kept or not torch.is_grad_enabled() or not _SAVE_CODES.get():
        yield
        return
    saver = _CodeSaver(kept)
    with torch.autograd.graph.saved_tensors_hooks(saver.pack, saver.unpack):
        yield
