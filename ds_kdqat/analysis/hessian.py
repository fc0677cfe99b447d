"""Loss-surface sharpness: the Hessian's dominant eigenvalues by power iteration on Hessian-vector products.

The Hessian ``H = ∇²_θ L`` is never formed. A product ``H·v`` costs two backward passes (Pearlmutter's
trick): ``g = ∇_θ L`` with ``create_graph=True``, then ``H·v = ∇_θ (g · v)``. Power iteration
``v ← H·v / ‖H·v‖`` converges to the eigenvector whose eigenvalue is largest in *magnitude*; the Rayleigh
quotient ``λ = vᵀ·H·v`` (with ``‖v‖ = 1``) is the estimate. Further eigenvalues come by deflation: each new
iterate is kept orthogonal (Gram–Schmidt) to the eigenvectors already found, so the iteration runs in their
orthogonal complement and finds the next largest in magnitude.

When the loss is a sum over several batches, pass one closure per batch: ``H·v`` is the mean of the
per-batch products (the Hessian of the mean loss).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

Vector = list[torch.Tensor]  # one tensor per parameter, same shapes as the parameters


def _dot(a: Vector, b: Vector) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def _normalize(v: Vector) -> Vector:
    norm = torch.sqrt(_dot(v, v))
    return [x / (norm + 1e-30) for x in v]


def _orthogonalize(v: Vector, basis: Sequence[Vector]) -> Vector:
    for u in basis:
        coefficient = _dot(v, u)
        v = [x - coefficient * y for x, y in zip(v, u)]
    return v


def hessian_vector_product(
    loss_fns: Sequence[Callable[[], torch.Tensor]], params: Sequence[torch.Tensor], vector: Vector
) -> Vector:
    """``H·v`` of the mean of the scalar losses returned by ``loss_fns`` w.r.t. ``params``.

    Parameters that the loss does not depend on get zero rows of ``H``.
    """
    total = [torch.zeros_like(p) for p in params]
    for loss_fn in loss_fns:
        loss = loss_fn()
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        pairs = [(g, v) for g, v in zip(grads, vector) if g is not None]
        if not pairs:
            continue
        inner = sum((g * v.detach()).sum() for g, v in pairs)
        if not inner.requires_grad:  # the loss is linear in params: H = 0
            continue
        hv = torch.autograd.grad(inner, params, allow_unused=True)
        total = [t + (h.detach() if h is not None else 0.0) for t, h in zip(total, hv)]
    return [t / len(loss_fns) for t in total]


@dataclass
class HessianEigen:
    """Result of :func:`top_hessian_eigenvalues`.

    ``values[i]`` is the i-th eigenvalue found (decreasing magnitude), ``vectors[i]`` its unit eigenvector
    (one tensor per parameter), ``iterations[i]`` the power-iteration steps it took and ``converged[i]``
    whether the relative change fell below ``tol`` before ``max_iter``.
    """

    values: list[float] = field(default_factory=list)
    vectors: list[Vector] = field(default_factory=list)
    iterations: list[int] = field(default_factory=list)
    converged: list[bool] = field(default_factory=list)


def top_hessian_eigenvalues(
    loss_fns: Callable[[], torch.Tensor] | Sequence[Callable[[], torch.Tensor]],
    params: Sequence[torch.Tensor],
    k: int = 1,
    max_iter: int = 100,
    tol: float = 1e-4,
    generator: Optional[torch.Generator] = None,
) -> HessianEigen:
    """The ``k`` eigenvalues of the Hessian largest in magnitude, by power iteration with deflation.

    Stops an eigenvalue when ``|λ_t − λ_{t−1}| ≤ tol · (|λ_{t−1}| + 1e-12)`` or after ``max_iter`` steps.
    ``generator`` seeds the random start vectors (standard normal), so results are reproducible.
    """
    if callable(loss_fns):
        loss_fns = [loss_fns]
    loss_fns = list(loss_fns)
    params = [p for p in params if p.requires_grad]
    if not loss_fns:
        raise ValueError("need at least one loss closure")
    if not params:
        raise ValueError("no parameter requires grad; nothing to differentiate")
    total_size = sum(p.numel() for p in params)
    if not 1 <= k <= total_size:
        raise ValueError(f"k must be between 1 and the number of parameters ({total_size}), got {k}")

    result = HessianEigen()
    for _ in range(k):
        v = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]
        v = _normalize(_orthogonalize(v, result.vectors))
        value, previous, steps, converged = 0.0, None, 0, False
        for steps in range(1, max_iter + 1):
            hv = _orthogonalize(hessian_vector_product(loss_fns, params, v), result.vectors)
            value = float(_dot(hv, v))
            norm = float(torch.sqrt(_dot(hv, hv)))
            if norm == 0.0:  # v lies in the null space (of the deflated Hessian): eigenvalue 0
                converged = True
                break
            v = [x / norm for x in hv]
            if previous is not None and abs(value - previous) <= tol * (abs(previous) + 1e-12):
                converged = True
                break
            previous = value
        result.values.append(value)
        result.vectors.append(v)
        result.iterations.append(steps)
        result.converged.append(converged)
    return result
