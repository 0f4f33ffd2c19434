"""Stochastic trace estimation: Hutchinson (Rademacher probes) and Hutch++ (Meyer et al., 2021)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_sharpness.curvature.probes import rademacher
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


def hutchinson(op: LinearOperator, matvecs: int = 100, generator: torch.Generator | None = None) -> TraceEstimate:
    """``tr(A) ~ mean_i v_i^T A v_i`` with Rademacher ``v_i``; unbiased, variance ``2 sum_{i!=j} A_ij^2``.

    Example::

        hutchinson(op, matvecs=200, generator=torch.Generator().manual_seed(0)).value
    """
    _check_budget(matvecs, 2)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    V = rademacher(op.dim, matvecs, generator, op.dtype, op.device)
    samples = (V * (op @ V)).double().sum(0)
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
    S = rademacher(op.dim, third, generator, op.dtype, op.device)
    Q, _ = torch.linalg.qr(op @ S)
    exact = float((Q * (op @ Q)).double().sum())
    n_rest = matvecs - 2 * third
    G = rademacher(op.dim, n_rest, generator, op.dtype, op.device)
    G = G - Q @ (Q.T @ G)
    samples = (G * (op @ G)).double().sum(0)
    stderr = float(samples.std() / n_rest**0.5) if n_rest > 1 else float("nan")
    return TraceEstimate(exact + float(samples.mean()), stderr, matvecs, samples)
