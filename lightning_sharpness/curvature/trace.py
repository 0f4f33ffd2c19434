"""Stochastic trace estimation: Hutchinson (Rademacher probes) and Hutch++ (Meyer et al., 2021)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_sharpness.curvature.probes import rademacher_rows
from lightning_sharpness.curvature.protocol import LinearOperator

__all__ = ["hutchinson", "hutchpp", "TraceEstimate"]


@dataclass
class TraceEstimate:
    """``value`` estimates ``tr(A)``; ``stderr`` is the standard error of its stochastic part."""

    value: float
    stderr: float
    matvecs: int
    samples: Tensor  # the per-probe estimates of the stochastic part

    def __float__(self) -> float:
        return self.value


def _check_budget(matvecs: int, least: int) -> None:
    if not (isinstance(matvecs, int) and matvecs >= least):
        raise ValueError(f"`matvecs` must be an int >= {least}, got {matvecs!r}.")


def _block(op: LinearOperator) -> int:
    return int(getattr(op, "chunk_size", 16))


def _products(op: LinearOperator, V: Tensor) -> Tensor:
    """``A v`` for each row ``v`` of ``V``, as rows."""
    rows = getattr(op, "matmat_rows", None)
    return rows(V) if rows is not None else (op @ V.T).T


def _looped(op: LinearOperator) -> bool:
    """Whether the operator's products are one backward pass per vector anyway (double backward looped, the CPU
    default, or ``jvp``): then a block buys nothing, and holding its products costs memory."""
    return getattr(op, "backend", None) in ("autograd", "jvp") and not getattr(op, "batched", True)


def _products_into(op: LinearOperator, V: Tensor, out: Tensor) -> Tensor:
    """``out[i] = A V[i]`` for the rows of ``V``. Where the products are looped anyway they are taken one row at a
    time into ``out``: a block of fresh ``(rows, dim)`` results (and their stacking) is memory the allocator maps
    and the kernel zeroes on every call, 17% of a product per vector on the 1M-parameter benchmark model."""
    if not _looped(op) or getattr(op, "matmat_rows", None) is None:
        out.copy_(_products(op, V))
        return out
    for i in range(V.shape[0]):
        out[i] = op.matmat_rows(V[i : i + 1])[0]
    return out


def _quadratic_forms(op: LinearOperator, V: Tensor) -> Tensor:
    """``v^T A v`` for each row ``v`` of ``V`` (float64). A :class:`HessianOperator` gives its products per
    parameter: each part is multiplied by its probes in place and reduced as it comes, with no ``(rows, dim)``
    copy; where its products are one backward pass per vector anyway (double backward looped, the CPU default, or
    ``jvp``) they are taken one row at a time, so only one product is held besides the probes. The +-1 products
    are exact, their sums per parameter (cascade summation) are within about ``1e-9`` of the float64 sum relative
    to the sum of magnitudes, and the parts are added in float64."""
    rows, numels = getattr(op, "matmat_rows", None), getattr(op, "numels", None)
    if rows is None or numels is None:
        return (V * (op @ V.T).T).sum(1, dtype=torch.float64)
    out = torch.zeros(V.shape[0], dtype=torch.float64, device=V.device)
    own = V.untyped_storage().data_ptr()
    start = 0
    while start < V.shape[0]:
        step = 1 if _looped(op) else V.shape[0]
        block = V[start : start + step]
        for v, h in zip(torch.split(block, numels, dim=1), rows(block, flat=False)):
            h = h.reshape(h.shape[0], -1)
            h = h.mul_(v) if h.untyped_storage().data_ptr() != own else h * v  # never write into the probes
            out[start : start + step] += h.sum(1).double()
        start += step
    return out


def hutchinson(op: LinearOperator, matvecs: int = 100, generator: torch.Generator | None = None) -> TraceEstimate:
    """``tr(A) ~ mean_i v_i^T A v_i`` with Rademacher ``v_i``; unbiased, variance ``2 sum_{i!=j} A_ij^2``.

    The probes are drawn in the working dtype a block of ``op.chunk_size`` (16 by default) at a time, and each
    block's ``v^T A v`` is reduced in float64 as its products come: beyond the operator's own memory, a call holds
    one block of probes and one of products.

    Example::

        hutchinson(op, matvecs=200, generator=torch.Generator().manual_seed(0)).value
    """
    _check_budget(matvecs, 2)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    samples = torch.empty(matvecs, dtype=torch.float64)
    block = _block(op)
    for start in range(0, matvecs, block):
        V = rademacher_rows(min(block, matvecs - start), op.dim, generator, op.dtype, op.device)
        samples[start : start + V.shape[0]] = _quadratic_forms(op, V).cpu()
        del V  # before the next block is drawn
    return TraceEstimate(float(samples.mean()), float(samples.std() / matvecs**0.5), matvecs, samples)


def hutchpp(op: LinearOperator, matvecs: int = 99, generator: torch.Generator | None = None) -> TraceEstimate:
    """Hutch++: the trace of a captured top subspace exactly, plus Hutchinson on the deflated rest.

    A third of the budget sketches ``A S``, a third computes ``Q^T A Q`` on its orthonormal basis ``Q``, and
    a third runs Hutchinson on ``(I - QQ^T) A (I - QQ^T)``. The error shrinks like ``1/matvecs`` instead of
    ``1/sqrt(matvecs)`` on matrices with decaying spectra (Hessians of trained networks). ``stderr`` is that of
    the Hutchinson part given ``Q``.

    Example::

        hutchpp(op, matvecs=99, generator=torch.Generator().manual_seed(0)).value
    """
    _check_budget(matvecs, 6)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    third = matvecs // 3
    if op.dim <= 2 * third:  # the sketch would cover the whole space: the trace is exact
        eye = torch.eye(op.dim, dtype=op.dtype, device=op.device)
        value = float(torch.diagonal(op @ eye).double().sum())
        return TraceEstimate(value, 0.0, op.dim, torch.zeros(0, dtype=torch.float64))
    block = _block(op)
    S = rademacher_rows(third, op.dim, generator, op.dtype, op.device)
    AS = _products_into(op, S, torch.empty_like(S))
    del S
    Q = torch.linalg.qr(AS.T).Q  # (dim, third); its transpose is row-major: the rows of Q^T
    del AS
    QT = Q.T
    exact = sum(float(_quadratic_forms(op, QT[i : i + block]).sum()) for i in range(0, third, block))
    n_rest = matvecs - 2 * third
    samples = torch.empty(n_rest, dtype=torch.float64)
    for start in range(0, n_rest, block):
        G = rademacher_rows(min(block, n_rest - start), op.dim, generator, op.dtype, op.device)
        G = G - (G @ Q) @ QT
        samples[start : start + G.shape[0]] = _quadratic_forms(op, G).cpu()
        del G
    stderr = float(samples.std() / n_rest**0.5) if n_rest > 1 else float("nan")
    return TraceEstimate(exact + float(samples.mean()), stderr, matvecs, samples)
