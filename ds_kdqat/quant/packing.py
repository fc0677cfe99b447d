"""Bit packing of unsigned integer codes (pure functions on uint8 tensors).

``pack_bits``: ``bits`` bits per code, little-endian inside each byte (code i occupies bits
``[i·bits, (i+1)·bits)`` of the stream), so 2-bit codes go 4 to a byte. ``pack_base3``: codes in {0, 1, 2},
5 to a byte as ``Σ cᵢ·3ⁱ`` (≤ 242), i.e. 1.6 bits per ternary code against the log2 3 ≈ 1.585 floor.
"""

from __future__ import annotations

import numpy as np
import torch

_POW3 = np.array([1, 3, 9, 27, 81], dtype=np.uint8)


def _as_uint8(codes: torch.Tensor) -> np.ndarray:
    return codes.detach().reshape(-1).to(device="cpu", dtype=torch.uint8).numpy()


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (any shape, values in [0, 2^bits)) → uint8 tensor of ``ceil(n·bits/8)`` bytes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2 ** bits}) for {bits}-bit packing")
    flat = _as_uint8(codes)
    if 8 % bits == 0:  # whole codes per byte (1, 2, 4, 8 bits): shift and OR, no bit planes
        per = 8 // bits
        padded = np.zeros(-(-flat.size // per) * per, dtype=np.uint8)
        padded[: flat.size] = flat
        fields = padded.reshape(-1, per) << (np.arange(per, dtype=np.uint8) * bits)
        return torch.from_numpy(np.bitwise_or.reduce(fields, axis=1).astype(np.uint8))
    planes = np.unpackbits(flat[:, None], axis=1, count=bits, bitorder="little")  # (n, bits), low bit first
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` codes as a 1-D uint8 tensor."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if packed.numel() * 8 < count * bits:
        raise ValueError(f"{packed.numel()} bytes hold fewer than {count} {bits}-bit codes")
    if 8 % bits == 0:
        per = 8 // bits
        fields = _as_uint8(packed)[:, None] >> (np.arange(per, dtype=np.uint8) * bits)
        return torch.from_numpy(np.ascontiguousarray((fields & (2**bits - 1)).reshape(-1)[:count]).astype(np.uint8))
    planes = np.unpackbits(_as_uint8(packed), count=count * bits, bitorder="little").reshape(count, bits)
    return torch.from_numpy(np.packbits(planes, axis=1, bitorder="little").reshape(-1))


def pack_base3(codes: torch.Tensor) -> torch.Tensor:
    """Codes in {0, 1, 2} (any shape) → uint8 tensor of ``ceil(n/5)`` bytes."""
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 2):
        raise ValueError("base-3 packing needs codes in {0, 1, 2}")
    flat = _as_uint8(codes)
    padded = np.zeros(-(-flat.size // 5) * 5, dtype=np.uint8)
    padded[: flat.size] = flat
    return torch.from_numpy((padded.reshape(-1, 5) * _POW3).sum(axis=1, dtype=np.uint16).astype(np.uint8))


def unpack_base3(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_base3`: the first ``count`` codes as a 1-D uint8 tensor."""
    if packed.numel() * 5 < count:
        raise ValueError(f"{packed.numel()} bytes hold fewer than {count} base-3 codes")
    digits = (_as_uint8(packed)[:, None] // _POW3) % 3
    return torch.from_numpy(np.ascontiguousarray(digits.reshape(-1)[:count]))
