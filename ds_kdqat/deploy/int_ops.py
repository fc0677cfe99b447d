"""Integer forms of quantized tensors, and the int8 GEMM (pure functions).

Every quantized tensor the student uses is written here as ``x̂ = a·Q + b``: ``Q`` int8 codes, ``a`` a scale and
``b`` a shift, each a scalar (one per tensor) or one per row (dim 0). For a linear layer with
``x̂ = a_x·Q_x + b_x`` (M, K) and ``Ŵ = diag(a_w)·Q_w + b_w·1ᵀ`` (N, K):

    x̂·Ŵᵀ [m, n] = a_x·a_w[n]·(Q_x·Q_wᵀ)[m, n] + b_x·a_w[n]·Σ_k Q_w[n, k]
                   + a_x·b_w[n]·Σ_k Q_x[m, k] + K·b_x·b_w[n]

where ``Q_x·Q_wᵀ`` is an int8 × int8 → int32 product, exact. The last two terms vanish for ternary, binary
and symmetric weights (``b_w = 0``). The codes are the trained student's own: ``Q`` is computed with the same
operations in the same order as the fake-quant forward (:mod:`ds_kdqat.quant.functional`), so only the float
rounding of the final scaling differs.

Weight kinds (:data:`WEIGHT_FORMS`, keyed by the stored code kind of :mod:`ds_kdqat.quant.methods`) take the
unsigned codes the packed export stores; activation encoders (:data:`ACTIVATION_ENCODERS`, keyed by the
activation method name) take a float tensor and the settings of its quantizer.

Two things keep the integer forward cheap in memory: the GEMM's int32 result is turned into the float output in
its own memory (:func:`linear_epilogue_`), and an activation is encoded a block of rows at a time
(:func:`encode_uniform`, :func:`encode_lsq`), so no float copy of a whole activation is made. Weights of 2 bits or
fewer can stay resident packed 4 codes to a byte (:func:`pack2`) and be unpacked just before their GEMM into a
reused buffer (:func:`unpack2`, :class:`CodeScratch`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Optional

import torch

INT8_MAX_BITS = 8


@dataclass
class IntTensor:
    """``x̂ = scale·(codes − zero_point) + shift``; ``codes`` int8 (``zero_point`` 0) or uint8 (an activation's
    codes moved by ``zero_point`` 128 for a u8 × s8 kernel); ``scale``/``shift`` float32 of shape ``()`` or
    ``(rows,)`` (one per index of dim 0); ``shift`` None means 0."""

    codes: torch.Tensor
    scale: torch.Tensor
    shift: Optional[torch.Tensor] = None
    zero_point: int = 0

    def dequantize(self) -> torch.Tensor:
        view = (-1,) + (1,) * (self.codes.dim() - 1)
        scale = self.scale.reshape(view) if self.scale.dim() else self.scale
        codes = self.codes.float()
        out = (codes.sub_(self.zero_point) if self.zero_point else codes) * scale
        if self.shift is not None:
            out = out + (self.shift.reshape(view) if self.shift.dim() else self.shift)
        return out


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A stored scale of shape ``()`` or ``(rows, 1, …)`` as ``()`` or ``(rows,)``."""
    return t.reshape(()) if t.numel() == 1 and t.dim() <= 1 else t.reshape(t.shape[0])


def _ternary(bits: int, codes: torch.Tensor, scale: torch.Tensor, offset) -> IntTensor:
    return IntTensor((codes.to(torch.int16) - 1).to(torch.int8), _rows(scale).float())  # stored b + 1


def _binary(bits: int, codes: torch.Tensor, scale: torch.Tensor, offset) -> IntTensor:
    return IntTensor((codes.to(torch.int16) * 2 - 1).to(torch.int8), _rows(scale).float())  # stored (b + 1)/2


def _symmetric(bits: int, codes: torch.Tensor, scale: torch.Tensor, offset) -> IntTensor:
    # stored q + 2^(b-1) - 1; x̂ = q / s
    q = codes.to(torch.int16) - (2 ** (bits - 1) - 1)
    return IntTensor(q.to(torch.int8), 1.0 / _rows(scale).float())


def _minmax(bits: int, codes: torch.Tensor, scale: torch.Tensor, offset) -> IntTensor:
    # stored c ∈ [0, 2^b − 1]; x̂ = c·s + m = s·(c − 2^(b−1)) + (m + 2^(b−1)·s)
    half = 2 ** (bits - 1)
    s, m = _rows(scale).float(), _rows(offset).float()
    return IntTensor((codes.to(torch.int16) - half).to(torch.int8), s, m + half * s)


WEIGHT_FORMS: dict[str, Callable[..., IntTensor]] = {
    "ternary": _ternary, "binary": _binary, "symmetric": _symmetric, "minmax": _minmax,
}
"""Stored code kind → ``(bits, unsigned codes, scale, offset) → IntTensor``."""


def weight_int_form(kind: str, bits: int, codes: torch.Tensor, scale: torch.Tensor,
                    offset: Optional[torch.Tensor]) -> IntTensor:
    """The integer form of a packed weight (codes already unpacked to its shape)."""
    if kind not in WEIGHT_FORMS:
        raise ValueError(f"no integer form for weight code kind {kind!r}; known: {sorted(WEIGHT_FORMS)}")
    if bits > INT8_MAX_BITS:
        raise ValueError(f"{bits}-bit weights do not fit int8 codes")
    return WEIGHT_FORMS[kind](bits, codes, scale, offset)


# --------------------------------------------------------------------------------------------------------------
# activations: per-tensor statistics of the current batch (uniform) or a learned step (LSQ)


def uniform_codes(x: torch.Tensor, bits: int, mode: str, clip: Optional[float],
                  zero_point: int = 0) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The codes of :func:`ds_kdqat.quant.functional.uniform_parts` (tensor granularity) with its float operations
    in its order, as integer-valued floats ``Q + zero_point`` (``Q`` signed: min-max codes moved by ``−2^(b−1)``),
    and ``(scale, shift)`` with ``x̂ = scale·Q + shift`` (``shift`` None for symmetric)."""
    if clip is not None:
        x = x.clamp(-clip, clip)
    info = torch.finfo(x.dtype)
    if mode == "symmetric":
        qmax = 2 ** (bits - 1) - 1
        scale = (qmax / x.abs().amax().clamp_min(info.tiny)).clamp_max(info.max)
        codes = torch.mul(x, scale).round_()
        return (codes.add_(zero_point) if zero_point else codes), 1.0 / scale, None
    lo, hi = torch.aminmax(x)
    step = ((hi - lo) / (2 ** bits - 1)).clamp_min(info.tiny)
    half = 2 ** (bits - 1)
    codes = torch.sub(x, lo).div_(step).round_()  # c ∈ [0, 2^b − 1]; Q = c − 2^(b−1)
    if zero_point != half:
        codes.add_(zero_point - half)
    return codes, step, lo + half * step


def lsq_codes(x: torch.Tensor, bits: int, step: torch.Tensor,
              zero_point: int = 0) -> tuple[torch.Tensor, torch.Tensor, None]:
    """The codes of :func:`ds_kdqat.quant.functional.lsq_parts`, ``round(clamp(x/s, −Q_N, Q_P))``, as
    integer-valued floats ``Q + zero_point``, and ``(s, None)``: ``x̂ = s·Q``."""
    q_n, q_p = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    step = step.reshape(())
    codes = torch.div(x, step).clamp_(-q_n, q_p).round_()
    return (codes.add_(zero_point) if zero_point else codes), step, None


ENCODE_BLOCK = 1 << 19
"""Elements per block of the activation encoders (2 MiB of float32): a block's float temporaries stay in cache,
and no float copy of a whole activation is made (the FFN's second input is 4·hidden wide)."""


CODE_DTYPES = {0: torch.int8, 128: torch.uint8}
"""Activation zero point → dtype of its codes: signed ``Q`` (int8 GEMM), or ``Q + 128`` (u8 × s8 GEMM)."""


def _code_dtype(zero_point: int) -> torch.dtype:
    if zero_point not in CODE_DTYPES:
        raise ValueError(f"activation zero point {zero_point}: expected one of {sorted(CODE_DTYPES)}")
    return CODE_DTYPES[zero_point]


def _encode_blocks(x: torch.Tensor, codes_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                   zero_point: int = 0) -> torch.Tensor:
    """Integer codes of ``x`` (…, K), a block of rows at a time: ``codes_of(x_block, scratch)`` writes the block's
    signed integer-valued float codes ``Q`` into ``scratch`` (the block's shape and ``x``'s dtype) and returns it;
    each block is cast into the int8 result (the cast of ``.to(torch.int8)``). ``zero_point`` 128: the result is
    then ``Q + 128`` as uint8, by flipping the top bit of each byte (cheaper than a float → uint8 cast). Returns
    the codes in ``x``'s shape."""
    dtype = _code_dtype(zero_point)
    flat = x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)
    out = torch.empty(flat.shape, dtype=torch.int8, device=x.device)
    rows = max(1, ENCODE_BLOCK // max(1, flat.shape[1]))
    scratch = torch.empty((min(rows, flat.shape[0]), flat.shape[1]), dtype=x.dtype, device=x.device)
    for start in range(0, flat.shape[0], rows):
        block = flat[start:start + rows]
        out[start:start + rows].copy_(codes_of(block, scratch[: block.shape[0]]))
    if dtype == torch.uint8:  # two's complement: Q XOR 0x80 read as unsigned is Q + 128
        out = out.bitwise_xor_(torch.tensor(-128, dtype=torch.int8, device=x.device)).view(torch.uint8)
    return out.reshape(x.shape)


def _clipped_range(x: torch.Tensor, clip: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(min, max)`` of ``x.clamp(−clip, clip)`` (exactly: clamping commutes with min and max)."""
    lo, hi = torch.aminmax(x)
    if clip is not None:
        lo, hi = lo.clamp(-clip, clip), hi.clamp(-clip, clip)
    return lo, hi


def encode_uniform(x: torch.Tensor, bits: int, mode: str, clip: Optional[float], zero_point: int = 0) -> IntTensor:
    """:func:`uniform_codes` as integer codes in ``x``'s shape (int8 ``Q``, or with ``zero_point`` 128 uint8
    ``Q + 128``), computed a block at a time: the same statistics and, per element, the same float operations in
    the same order, so the same codes.

    min-max: ``Q = round((clamp(x) − min)/s) − 2^(b−1)``, ``s = (max − min)/(2^b − 1)``,
    ``x̂ = s·Q + (min + 2^(b−1)·s)``;
    symmetric: ``Q = round(clamp(x)·t)``, ``t = (2^(b−1) − 1)/max|clamp(x)|``, ``x̂ = Q/t``.
    """
    info = torch.finfo(x.dtype)
    lo, hi = _clipped_range(x, clip)
    if mode == "symmetric":
        qmax = 2 ** (bits - 1) - 1
        scale = (qmax / torch.maximum(lo.abs(), hi.abs()).clamp_min(info.tiny)).clamp_max(info.max)

        def symmetric(block: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            if clip is not None:
                return torch.clamp(block, -clip, clip, out=out).mul_(scale).round_()
            return torch.mul(block, scale, out=out).round_()

        return IntTensor(_encode_blocks(x, symmetric, zero_point), 1.0 / scale, None, zero_point)
    step = ((hi - lo) / (2 ** bits - 1)).clamp_min(info.tiny)
    half = 2 ** (bits - 1)

    def minmax(block: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if clip is not None:
            shifted = torch.clamp(block, -clip, clip, out=out).sub_(lo)
        else:
            shifted = torch.sub(block, lo, out=out)
        return shifted.div_(step).round_().add_(-half)  # c ∈ [0, 2^b − 1]; Q = c − 2^(b−1)

    return IntTensor(_encode_blocks(x, minmax, zero_point), step, lo + half * step, zero_point)


def encode_lsq(x: torch.Tensor, bits: int, step: torch.Tensor, zero_point: int = 0) -> IntTensor:
    """:func:`lsq_codes` as integer codes (int8 ``Q``, or uint8 ``Q + 128``), a block at a time:
    ``Q = round(clamp(x/s, −Q_N, Q_P))``."""
    q_n, q_p = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    step = step.reshape(())

    def lsq(block: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return torch.div(block, step, out=out).clamp_(-q_n, q_p).round_()

    return IntTensor(_encode_blocks(x, lsq, zero_point), step, None, zero_point)


ACTIVATION_ENCODERS: dict[str, Callable[..., IntTensor]] = {"uniform": encode_uniform, "lsq": encode_lsq}
"""Activation method → ``(x, bits, …its settings[, zero_point]) → IntTensor`` (uniform: mode, clip; lsq: step)."""


def fake_uniform(x: torch.Tensor, bits: int, mode: str, clip: Optional[float]) -> torch.Tensor:
    """The uniform fake-quantized activation (one scale per tensor) of :mod:`ds_kdqat.quant.functional`
    (``_fake_uniform``: the same statistics and per element the same float operations in the same order, so the
    same values), written into a new contiguous tensor whatever ``x``'s strides (a batched matmul reads a
    contiguous operand fastest). Float16/bfloat16 ``x``: computed in float32, returned in ``x``'s dtype.

    min-max: ``x̂ = round((x − min)/s)·s + min``, ``s = (max − min)/(2^b − 1)``; symmetric: ``x̂ = round(x·t)/t``,
    ``t = (2^(b−1) − 1)/max|x|`` (after clamping to ``±clip``)."""
    work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if clip is not None:
        work = work.clamp(-clip, clip)
    info = torch.finfo(work.dtype)
    out = torch.empty(work.shape, dtype=work.dtype, device=work.device)
    lo, hi = torch.aminmax(work)
    if mode == "symmetric":
        qmax = 2 ** (bits - 1) - 1
        scale = (qmax / torch.maximum(lo.abs(), hi.abs()).clamp_min(info.tiny)).clamp_max(info.max)
        out = torch.mul(work, scale, out=out).round_().div_(scale)
    else:
        step = ((hi - lo) / (2 ** bits - 1)).clamp_min(info.tiny)
        out = torch.sub(work, lo, out=out).div_(step).round_().mul_(step).add_(lo)
    return out.to(x.dtype)


def fake_lsq(x: torch.Tensor, bits: int, step: torch.Tensor) -> torch.Tensor:
    """LSQ's fake-quantized activation without autograd (:func:`ds_kdqat.quant.functional.lsq_quantize`:
    ``round(clamp(x/s, −Q_N, Q_P))·s``, the same operations), written into a new contiguous tensor."""
    q_n, q_p = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    step = step.to(x.dtype)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return torch.div(x, step, out=out).clamp_(-q_n, q_p).round_().mul_(step)


# --------------------------------------------------------------------------------------------------------------
# resident 2-bit weight codes


PACKED2_RANGE = (-2, 1)
"""Signed codes :func:`pack2` holds (2-bit two's complement): the int forms of every weight of 2 bits or fewer
(ternary and binary ``{−1, 0, 1}``, 2-bit symmetric ``{−1, 0, 1}``, 2-bit min-max ``{−2, …, 1}``)."""


def pack2(codes: torch.Tensor) -> torch.Tensor:
    """Signed codes in :data:`PACKED2_RANGE` (any shape, ``L`` of them, row-major) → ``(P,)`` uint8, ``P = ⌈L/4⌉``.

    Quarter layout: byte ``p`` holds codes ``p, P + p, 2P + p, 3P + p`` (zero-padded past ``L``) in its bits
    ``0–1, 2–3, 4–5, 6–7`` as 2-bit two's complement, so :func:`unpack2` writes four contiguous quarters with
    one shift pair each.
    """
    flat = codes.reshape(-1)
    if flat.numel() and (int(flat.min()) < PACKED2_RANGE[0] or int(flat.max()) > PACKED2_RANGE[1]):
        raise ValueError(f"2-bit packing needs codes in [{PACKED2_RANGE[0]}, {PACKED2_RANGE[1]}], got "
                         f"[{int(flat.min())}, {int(flat.max())}]")
    quarter = -(-flat.numel() // 4)
    padded = torch.zeros(4 * quarter, dtype=torch.uint8, device=codes.device)
    padded[: flat.numel()] = flat.to(torch.int16).bitwise_and(3).to(torch.uint8)
    fields = padded.view(4, quarter)
    return fields[0] | (fields[1] << 2) | (fields[2] << 4) | (fields[3] << 6)


def unpack2(packed: torch.Tensor, count: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Inverse of :func:`pack2`: the first ``count`` codes as int8 ``(count,)``, written into ``out`` (int8,
    contiguous, at least ``4·P`` elements; a new tensor when None). Field ``i`` of every byte is moved to the top
    of the byte and shifted back arithmetically (sign-extended): seven element-wise passes over the packed bytes."""
    quarter = packed.numel()
    if count > 4 * quarter:
        raise ValueError(f"{quarter} bytes hold fewer than {count} 2-bit codes")
    if out is None:
        out = torch.empty(4 * quarter, dtype=torch.int8, device=packed.device)
    elif out.dtype != torch.int8 or not out.is_contiguous() or out.numel() < 4 * quarter:
        raise ValueError(f"out must be a contiguous int8 tensor of at least {4 * quarter} elements")
    signed = packed.view(torch.int8)
    fields = out[: 4 * quarter].view(4, quarter)
    for i in range(3):
        torch.bitwise_left_shift(signed, 6 - 2 * i, out=fields[i]).bitwise_right_shift_(6)
    torch.bitwise_right_shift(signed, 6, out=fields[3])
    return out[:count]


class CodeScratch:
    """The reused int8 buffer that packed weights are unpacked into just before their GEMM, one per thread and
    device (so concurrent forwards in different threads do not share one); it grows to the largest request.

    One instance serves every packed module of a model (:func:`ds_kdqat.deploy.int_modules.integerize` shares
    it): its memory is that of the largest unpacked weight, not a copy of each. A copy or pickle of it is a new,
    empty scratch.
    """

    def __init__(self):
        self._local = threading.local()

    def take(self, numel: int, device: torch.device) -> torch.Tensor:
        """A contiguous int8 ``(numel,)`` view of this thread's buffer on ``device``; valid until the next take."""
        buffers = self._local.__dict__.setdefault("buffers", {})
        buffer = buffers.get(device)
        if buffer is None or buffer.numel() < numel:
            buffers[device] = buffer = None  # the old buffer is freed before the larger one is allocated
            buffers[device] = buffer = torch.empty(numel, dtype=torch.int8, device=device)
        return buffer[:numel]

    def nbytes(self) -> int:
        """Bytes held by this thread's buffers."""
        return sum(b.numel() for b in self._local.__dict__.get("buffers", {}).values())

    def __reduce__(self):
        return (CodeScratch, ())


# --------------------------------------------------------------------------------------------------------------
# int8 GEMM


def _int_mm_works() -> bool:
    try:
        a = torch.ones(17, 16, dtype=torch.int8)
        b = torch.ones(16, 8, dtype=torch.int8)
        return bool((torch._int_mm(a, b) == 16).all())
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


_INT_MM = None


def has_int8_gemm() -> bool:
    """Whether this PyTorch build runs ``torch._int_mm`` (int8 × int8 → int32) on the CPU."""
    global _INT_MM
    if _INT_MM is None:
        _INT_MM = _int_mm_works()
    return _INT_MM


def int8_matmul(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """``a`` (M, K) int8 · ``b_t`` (K, N) int8 → (M, N) int32, exact.

    ``torch._int_mm`` where it runs (oneDNN/VNNI on x86); otherwise an int32 product of the codes (slow, exact).
    """
    if has_int8_gemm() and a.device.type == "cpu":
        try:
            return torch._int_mm(a, b_t)
        except RuntimeError:  # shapes the kernel refuses (it wants K and N multiples of 8 on some builds)
            pass
    return torch.matmul(a.to(torch.int32), b_t.to(torch.int32))


def float_in_place(acc: torch.Tensor) -> torch.Tensor:
    """int32 ``acc`` as float32 in its own memory (same element size; the int32 tensor must not be read after).
    A non-contiguous or non-int32 input is converted into a new tensor."""
    if acc.dtype != torch.int32 or not acc.is_contiguous():
        return acc.float()
    return acc.view(torch.float32).copy_(acc)


def linear_epilogue_(acc: torch.Tensor, x: IntTensor, w_scale: torch.Tensor, w_shift: Optional[torch.Tensor],
                     w_code_sums: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The float part of :func:`int_linear`, in ``acc``'s memory: (M, N) int32 → (M, N) float32

        y = float(acc)·(a_x·a_w) [+ (a_x·b_w)·Σ_k Q_x[m, k]] + c,   c = a_w·Σ_k Q_w·b_x [+ K·b_x·b_w] + bias

    with ``a_w``, ``b_w``, ``Σ_k Q_w`` and ``bias`` () or (N,) (one value per output column). Three passes over
    (M, N) (cast, scale, add; no shift or bias: two), no new (M, N) tensor."""
    if x.zero_point:
        raise ValueError("the int8 GEMM's epilogue takes signed activation codes (zero point 0)")
    out = float_in_place(acc).mul_(x.scale * w_scale)
    constant = w_scale * w_code_sums * x.shift if x.shift is not None else None
    if w_shift is not None:
        k = x.codes.shape[1]
        row_sums = x.codes.sum(dim=1, dtype=torch.int32).float()  # (M,)
        out.addmm_(row_sums.unsqueeze(1), (x.scale * w_shift * torch.ones_like(w_code_sums)).unsqueeze(0))
        if x.shift is not None:
            constant = constant + k * x.shift * w_shift
    if bias is not None:
        constant = bias if constant is None else constant + bias
    return out if constant is None else out.add_(constant)


def int_linear(x: IntTensor, w_codes_t: torch.Tensor, w_scale: torch.Tensor, w_shift: Optional[torch.Tensor],
               w_code_sums: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x̂·Ŵᵀ + bias`` from integer forms (see the module docstring).

    ``x.codes`` (M, K) int8 with scalar ``x.scale``/``x.shift``; ``w_codes_t`` (K, N) int8 (``Q_wᵀ``);
    ``w_scale`` ``a_w`` and ``w_shift`` ``b_w`` () or (N,); ``w_code_sums`` (N,) float32 ``Σ_k Q_w[n, k]``.
    Returns (M, N) float32 (:func:`linear_epilogue_` of the int32 product).
    """
    return linear_epilogue_(int8_matmul(x.codes, w_codes_t), x, w_scale, w_shift, w_code_sums, bias)


# --------------------------------------------------------------------------------------------------------------
# oneDNN's u8 × s8 GEMM with the float epilogue fused (x86 CPUs)

ONEDNN_ZERO_POINT = 128
"""Activation zero point of the oneDNN kernel: it takes ``Q_x + 128`` as uint8 (its signed-input path is a slow
reference kernel)."""


def _onednn_ops() -> bool:
    ops = getattr(torch.ops, "onednn", None)
    try:
        return ops is not None and hasattr(ops, "qlinear_prepack") and hasattr(ops, "qlinear_pointwise") \
            and torch.backends.mkldnn.is_available()
    except (AttributeError, RuntimeError):
        return False


_ONEDNN = None


def _extreme_codes(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """Random int8 codes (rows, cols) with a row of 127s and a row of −128s: the products that saturate the 16-bit
    pair sums of x86 CPUs without VNNI, where oneDNN's u8 × s8 kernel is not exact."""
    codes = torch.randint(-128, 128, (rows, cols), dtype=torch.int8, generator=generator)
    codes[0], codes[1] = 127, -128
    return codes


def has_onednn_linear() -> bool:
    """Whether this PyTorch build runs oneDNN's quantized linear (``torch.ops.onednn.qlinear_pointwise``, the
    kernel of inductor's x86 int8 path) on the CPU and it gives the exact integer product even for extreme
    8-bit codes (probed once)."""
    global _ONEDNN
    if _ONEDNN is None:
        _ONEDNN = False
        if _onednn_ops():
            try:
                generator = torch.Generator().manual_seed(0)
                codes = _extreme_codes(24, 64, generator)
                x = IntTensor(_extreme_codes(17, 64, generator), torch.tensor(1.0))
                weight = OnednnWeight(codes, torch.tensor(1.0))
                got = onednn_linear(encode_shift(x), weight, codes.sum(1, dtype=torch.int32).float(), None)
                _ONEDNN = bool(torch.equal(got, torch.matmul(x.codes.int(), codes.int().t()).float()))
            except (RuntimeError, NotImplementedError, AttributeError, TypeError):
                _ONEDNN = False
    return _ONEDNN


def encode_shift(x: IntTensor) -> IntTensor:
    """Signed int8 codes as the oneDNN kernel's uint8 ``Q + 128`` (for tests and the probe)."""
    return IntTensor((x.codes.to(torch.int16) + ONEDNN_ZERO_POINT).to(torch.uint8), x.scale, x.shift,
                     ONEDNN_ZERO_POINT)


class OnednnWeight:
    """A weight's int8 codes (N, K) prepacked for :func:`onednn_linear`, with its scale per output column.

    The prepacked tensor is opaque (it can be neither copied nor pickled): a copy or pickle of this object
    prepacks the codes again. ``codes()`` gives them back as a plain (N, K) int8 tensor.
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor):
        if codes.dtype != torch.int8 or codes.dim() != 2 or codes.device.type != "cpu":
            raise ValueError("oneDNN's quantized linear takes int8 (out, in) weight codes on the CPU")
        self.shape = tuple(codes.shape)
        self.packed = torch.ops.onednn.qlinear_prepack(codes.contiguous(), None)
        self.scale = scale.float().expand(self.shape[0]).contiguous()  # (N,)
        self.zero_points = torch.zeros(self.shape[0], dtype=torch.int64)

    def codes(self) -> torch.Tensor:
        return self.packed.to_dense().t().contiguous()

    def __reduce__(self):
        return (OnednnWeight, (self.codes(), self.scale.clone()))


def onednn_linear(x: IntTensor, weight: OnednnWeight, w_code_sums: torch.Tensor,
                  bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x̂·Ŵᵀ + bias`` (M, N) float32 by oneDNN in one call: the u8 × s8 → s32 GEMM of ``Q_x + 128`` with the
    zero-point correction and the epilogue ``acc·(a_x·a_w[n]) + c[n]`` fused, ``c = a_w·Σ_k Q_w·b_x + bias``
    (ternary, binary and symmetric weights: no weight shift). ``x``: uint8 codes (M, K) with zero point 128."""
    if x.zero_point != ONEDNN_ZERO_POINT or x.codes.dtype != torch.uint8:
        raise ValueError("oneDNN's quantized linear takes uint8 activation codes with zero point 128")
    constant = weight.scale * w_code_sums * x.shift if x.shift is not None else None
    if bias is not None:
        constant = bias if constant is None else constant + bias
    return torch.ops.onednn.qlinear_pointwise(x.codes, float(x.scale), ONEDNN_ZERO_POINT, weight.packed, weight.scale,
                                              weight.zero_points, constant, 1.0, 0, torch.float32, "none", [], "")
